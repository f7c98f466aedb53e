"""selfattn's benchmark: ``python -m selfattn.bench`` (``--help`` for the options).

What it measures, in one run:

* the **attention core**: ``selfattn.attention`` against ``F.scaled_dot_product_attention`` on
  the same (B, H, N, D) tensors (on CUDA, SDPA once per backend forced with ``sdpa_kernel``,
  and once with its own choice, each row naming the backend);
* the **whole layer**, input (B, N, E) -> packed projection to 3M (M = E, no bias) -> H heads,
  no output projection: the tutorial's module (``selfattn.reference``), eager matmul + softmax
  + matmul, ``F.linear`` + SDPA (the strongest fair baseline), ``nn.MultiheadAttention`` (which
  also runs its output projection: more work, counted in its FLOPs) and selfattn's fused
  ``SelfAttention``;
* in modes ``fwd`` (under ``torch.no_grad``), ``fwd+bwd`` (forward, then ``autograd.grad`` of
  the inputs and parameters) and, when asked, ``bwd`` (backward alone, on a retained graph).

How:

* **time**: every implementation of a group (plus a large GEMM) is warmed up, then timed in
  interleaved rounds, the order rotating each round; one sample is the mean of enough calls
  to last ``target`` ms (CPU: ``time.perf_counter``; CUDA: CUDA events). Inputs rotate over
  several sets so caches do not flatter. Reported: the median and min-max over the rounds;
  GFLOP/s (DESIGN.md's count: attention 4·B·H·N²·D forward, half when causal, backward 2.5×
  forward; projections 6·B·N·E·M forward, twice that backward); the percentage of the GEMM
  rate timed in the same rounds; selfattn's speedup over each other row = the median (min-max)
  of the per-round ratios t_row / t_selfattn.
* **memory**: CPU: in a child process per case, each implementation first runs once on a tiny
  input (to load its code), then the child returns freed memory to the OS (``malloc_trim``),
  resets its peak RSS (``/proc/self/clear_refs`` ← 5), and reads ``VmHWM`` − ``VmRSS`` around one
  call: the peak resident growth over a baseline that holds the inputs and parameters. Where
  clear_refs is refused, one fresh child per measurement uses ``ru_maxrss`` instead. CUDA:
  ``torch.cuda.max_memory_allocated`` over ``memory_allocated``, reset between measurements.
* **skips**: before anything runs, each implementation's peak is estimated from its
  algorithm (the tutorial's broadcast builds B·H·N²·D elements; eager keeps B·H·N² scores);
  one whose estimate exceeds the memory budget (default: 60 % of the memory available at start)
  is reported as skipped with its estimate — never run into the OOM killer.
"""
