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
* with ``--sweep masks``, the **masked variants** (``variants.py``; the ``masks`` level): a key
  padding mask, packed varlen (when ``selfattn.attention_varlen`` exists; skipped with a note
  otherwise), GQA, a sliding window and a random bool mask, each against selfattn on the same
  shape without the variant (``selfattn plain``), SDPA given the same inputs and, for varlen,
  selfattn once per sequence; its summary shows each ratio in its target's direction;
* in modes ``fwd`` (under ``torch.no_grad``), ``fwd+bwd`` (forward, then ``autograd.grad`` of
  the inputs and parameters) and, when asked, ``bwd`` (backward alone, on a retained graph).

How:

* **time**: every implementation of a group (plus a large GEMM) is warmed up, then timed in
  interleaved rounds, the order rotating each round; one sample is the mean of enough calls
  to last ``target`` ms (CPU: ``time.perf_counter``; CUDA: CUDA events). Inputs rotate over
  several sets so caches do not flatter. Reported: the median and min-max over the rounds;
  GFLOP/s (the FLOP count below); the percentage of the GEMM rate timed in the same rounds;
  selfattn's speedup over each other row = the median (min-max) of the per-round ratios
  t_row / t_selfattn, over at least 7 rounds (below).
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

Conventions (the code cites them as "the package docstring"):

* **FLOP count** (``cases.py``): attention forward 4·B·H·Nq·Nk·D (QKᵀ and PV, 2·Nq·Nk·D each
  per head); causal, half that — for every implementation, so eager and the reference, which
  compute every score and then mask, are credited with the useful half only. Attention backward
  2.5× forward (FlashAttention's count: the four gradient matmuls and the recomputed scores).
  Projections: 6·B·N·E·M forward (x·Wᵀ to q, k and v), twice that backward (dx and dW).
  nn.MultiheadAttention is also credited with its output projection, 2·B·N·M·E forward.
  Softmax, scaling and masking are not counted. The rate is FLOPs / median time. The masks
  level counts 4·D per visible (query, key) pair forward (backward 2.5×), the pairs counted
  exactly for each row's own problem (``Impl.flops``; ``variants.py``): padding N·Σn_b per head,
  varlen Σn_s², a window its band, a random mask its True elements.
* **At least 7 rounds** (``measure.MIN_PAIRS``, the ``--repeats`` default): a speedup is the
  median of per-round ratios, each from one round in which both rows ran back to back, so a
  drift of the machine (another process, the clock) hits both sides of a ratio; with 7 rounds,
  up to 3 disturbed ones cannot carry the median outside the range of the others. Fewer rounds
  are allowed, with a warning that the ratios are indicative only.

Layout:

* ``cases.py``: shapes, cases, levels (a level's inputs, FLOP count and title), the sweeps;
* ``variants.py``: the masks level's variants: their masks and lengths (a fixed seed), visible
  pairs and targets;
* ``impls.py``: the implementations (``IMPLEMENTATIONS``), their builders and memory
  estimates, the inputs and the step that runs one call;
* ``measure.py``: the devices (clock, GEMM rate, memory budget, peak memory), interleaved
  timing, summaries and ratios, the CPU's memory child process;
* ``run.py``: the run loop, a ``records.Record`` per (case, level, implementation);
* ``records.py``: the dataclasses a run produces; the JSON file is them as dicts;
* ``report.py``: the markdown tables (the summaries share one builder) and the plot;
* the sweeps with options of their own (``--sweep NAME``, ``__main__.RUNNERS``): ``decode.py``,
  ``blocking.py``, ``isa.py``, ``ring.py`` (starts its own ranks); and those that time a few named calls against a baseline through
  ``contest.py`` (common options, interleaved rounds by ``measure.py``, ratios, table, JSON):
  ``overhead.py``, ``dropout.py``, ``jvp.py``, ``bf16.py``, ``transformers.py`` (imports transformers
  only when run);
* ``__main__.py``: the command line. The /proc and libc readers are in ``selfattn/_system.py``.

Adding to it:

* **an implementation**: a builder ``(case, device, example inputs) -> Built(forward, params)``
  in ``impls.py`` and one ``Impl(name, level, builder, estimate)`` line in ``IMPLEMENTATIONS``;
  ``estimate`` counts the activation-, score- and broadcast-sized tensors alive at its peak
  (``_estimate``), ``devices=("cuda",)`` keeps it off the CPU, ``extra_flops`` credits work
  beyond the level's count. It then runs in every case of its level, timed against selfattn,
  and ``--impls`` can pick it.
* **a new kind of case** (KV-cache decoding, variable-length batches): a level in
  ``cases.LEVELS`` — its input shapes (the output has the first one's shape), FLOP count and
  report title — and its implementations in ``IMPLEMENTATIONS`` with that level; ``--level``
  offers it, and a sweep's ``levels`` can name it.
* **a variant of the cases** (a mask kind, GQA's KV heads): a field with a default on ``Case``
  (or ``Shape``), in its ``label``, ``to_json`` and ``from_json``, used by the levels' input
  shapes and FLOPs and by the builders that support it. A **masked variant** of the core: an
  entry in ``variants.VARIANTS`` (its visible pairs, what SDPA and the plain row are given, its
  targets), a case of it in the ``masks`` sweep, and its branch in the masks builders of
  ``impls.py``; a row that needs other inputs than (B, Hq, N, D) q and (B, Hk, N, D) k, v makes
  them in ``Built.adapt`` (untimed), and ``Impl.applies`` keeps a row to the cases it fits.
* **a dtype**: an entry in ``cases.DTYPES``; **a sweep**: an entry in ``cases.SWEEPS``.
"""
