"""Benchmarks and diagnostics of CLIP-RPN. Run them from the repository root as modules, e.g.
``python -m benchmarks.evaluate CKPT --sets rain100l``; helpers they share are in ``benchmarks.common``.
They use ``cliprpn_core`` only (never ``nodes/``), so every figure comes from the code the CLI and nodes run."""
