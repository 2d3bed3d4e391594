"""`python -m pagedserve.worker`: one tensor-parallel rank (see tp_worker.main). Its own entry
module, so tp_worker runs as the one module its message classes are unpickled into."""
from pagedserve.worker.tp_worker import main

main()
