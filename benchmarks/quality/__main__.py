"""``python -m benchmarks.quality``: see :mod:`benchmarks.quality.cli`."""

from benchmarks.quality import cli

if __name__ == '__main__':
  cli.main()
