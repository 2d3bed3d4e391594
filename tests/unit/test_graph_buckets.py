"""The CUDA-graph bucket lists (pure functions: the graphs themselves need a GPU)."""
from pagedserve.worker.cuda_graph import batch_size_buckets, prefill_token_buckets


def test_decode_buckets():
    assert batch_size_buckets(512) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                                       320, 384, 448, 512]
    assert batch_size_buckets(1024) == batch_size_buckets(512)
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_prefill_buckets():
    assert prefill_token_buckets(8192) == [16, 32] + list(range(64, 1025, 64))
    assert prefill_token_buckets(300) == [16, 32, 64, 128, 192, 256]
    assert prefill_token_buckets(8) == []
