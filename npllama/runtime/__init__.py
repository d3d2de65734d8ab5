"""How npllama runs, apart from what it computes: the CPU's cores and allocator (cpu.py), weights kept
as stored and multiplied block by block (streamed.py), and the workers a training step's gradients
are summed across (parallel.py)."""
