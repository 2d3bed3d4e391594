import time, mmap, torch
torch.cuda.init(); torch.zeros(1, device="cuda")
reg = torch.cuda.cudart().cudaHostRegister
unreg = torch.cuda.cudart().cudaHostUnregister
for nbytes in (2 << 20, 32 << 20, 256 << 20, 4 << 30):
    raw = torch.empty(nbytes, dtype=torch.uint8)
    raw[::mmap.PAGESIZE].zero_()
    t0 = time.monotonic(); reg(raw.data_ptr(), nbytes, 3); t1 = time.monotonic()
    unreg(raw.data_ptr()); t2 = time.monotonic()
    print(f"idle GPU: register {nbytes >> 20} MiB {1e3*(t1-t0):.1f} ms, unregister {1e3*(t2-t1):.1f} ms", flush=True)
# while the GPU is busy: a stream of 20 ms matmuls
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for nbytes in (2 << 20, 32 << 20):
    raw = torch.empty(nbytes, dtype=torch.uint8); raw[::mmap.PAGESIZE].zero_()
    for _ in range(20): a @ a
    t0 = time.monotonic(); reg(raw.data_ptr(), nbytes, 3); t1 = time.monotonic()
    torch.cuda.synchronize(); t2 = time.monotonic()
    print(f"busy GPU: register {nbytes >> 20} MiB {1e3*(t1-t0):.1f} ms (then sync {1e3*(t2-t1):.1f} ms)", flush=True)
    unreg(raw.data_ptr())
# pinned allocation at once
t0 = time.monotonic(); p = torch.empty(4 << 30, dtype=torch.uint8, pin_memory=True); t1 = time.monotonic()
print(f"torch pinned alloc 4 GiB {1e3*(t1-t0):.1f} ms")
