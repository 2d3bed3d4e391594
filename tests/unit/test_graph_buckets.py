"""The CUDA-graph bucket lists (pure functions: the graphs themselves need a GPU)."""
import pytest

from pagedserve.worker.cuda_graph import batch_size_buckets, prefill_token_buckets


def test_decode_buckets():
    assert batch_size_buckets(512) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                                       320, 384, 448, 512]
    assert batch_size_buckets(1024) == batch_size_buckets(512)
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_gemv_row_buckets_are_decode_graph_sizes():
    """A decode step padded to its graph's size meets the gemv table's row bucket exactly (the
    launches were timed at those counts), and the table covers every size up to the gemv's limit."""
    triton_gemv = pytest.importorskip("pagedserve.layers.triton_gemv")
    sizes = [b for b in batch_size_buckets(512) if 1 < b <= triton_gemv.MAX_ROWS]
    assert sizes == list(triton_gemv.ROW_BUCKETS)
    shapes = {(n, k) for (_, n, k) in triton_gemv.MCONFIGS}
    assert {(b, n, k) for b in sizes for n, k in shapes} == set(triton_gemv.MCONFIGS)


def test_prefill_buckets():
    assert prefill_token_buckets(8192) == [16, 32] + list(range(64, 1025, 64))
    assert prefill_token_buckets(300) == [16, 32, 64, 128, 192, 256]
    assert prefill_token_buckets(8) == []


def _graph_runner_stub(buckets, graphs=True):
    from types import SimpleNamespace
    from pagedserve.worker.cuda_graph import CudaGraphRunner
    stub = SimpleNamespace(buckets=buckets, graphs={b: object() for b in buckets} if graphs else {})
    stub.logits_rows = CudaGraphRunner.logits_rows.__get__(stub)
    return stub


def test_logits_rows_pad_cublas_counts_to_the_decode_bucket():
    graphs = _graph_runner_stub(batch_size_buckets(512))
    # the gemv's rows (<= 16) and the buckets themselves stay; cuBLAS's counts go up to a bucket
    assert [graphs.logits_rows(r) for r in (1, 3, 16, 17, 23, 32, 33, 129, 257, 500, 512)] == \
        [1, 3, 16, 32, 32, 32, 48, 160, 320, 512, 512]
    assert graphs.logits_rows(513) == 513   # past the largest graph: as it is
    assert _graph_runner_stub(batch_size_buckets(512), graphs=False).logits_rows(23) == 23


def test_runner_logits_pads_and_drops_the_padding_rows():
    """ModelRunner._logits: the LM head sees the bucket's rows (row 0 repeated), the caller gets
    its own rows, exactly what the unpadded head gives."""
    from types import SimpleNamespace
    import torch
    from pagedserve.worker.model_runner import ModelRunner
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    seen = []

    def compute_logits(h):
        seen.append(h.shape[0])
        return torch.stack([weight @ row for row in h])   # row by row: no dependence on the count

    hidden = torch.randn(40, 8)
    indices = torch.arange(3, 26)   # 23 rows
    runner = SimpleNamespace(graph_runner=_graph_runner_stub(batch_size_buckets(512)),
                             model=SimpleNamespace(compute_logits=compute_logits))
    logits = ModelRunner._logits(runner, hidden, indices)
    assert seen == [32] and logits.shape == (23, 50) and logits.is_contiguous()
    assert torch.equal(logits, compute_logits(hidden[indices]))
    runner.graph_runner = None   # CPU: no graphs, no padding
    seen.clear()
    assert torch.equal(ModelRunner._logits(runner, hidden, indices), logits) and seen == [23]
    runner.model = SimpleNamespace(compute_logits=lambda h: None)   # a TP rank other than 0
    runner.graph_runner = _graph_runner_stub(batch_size_buckets(512))
    assert ModelRunner._logits(runner, hidden, indices) is None
