"""Tool support outside the library: benchmarks, sweeps, plots and the GPU check."""
