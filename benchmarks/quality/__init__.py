r"""Quality study (issue 11): does Flora's compressed momentum train as well?

Every optimizer here is the same Adafactor (factored second moment, block-RMS
clipping at 1.0, no parameter scale, the same warmup-cosine schedule), and the
rows differ only in the first moment:

- ``adafactor``: uncompressed momentum 0.9 (``optax.adafactor``);
- ``adafactor_nomomentum``: none;
- ``flora_paper``: Flora's momentum as in the paper (``residual=False``,
  right after ``scale_by_factored_rms``);
- ``flora_residual_<scale>_<position>``: residual momentum (DESIGN.md section
  2) with the subspace part scaled as ``Π_c M`` (``projection``) or
  ``decompress_c(M)`` (``unbiased``), the momentum in the paper's position or
  in ``optax.adafactor``'s (after clipping and the learning rate). The
  ``unbiased`` rows are recorded in the results and reported, no longer run:
  flora_optax dropped that option once the study had settled it;
- ``lora``: uncompressed momentum on a LoRA-reparametrised model of the same
  rank (``W = W0 + A B``, ``W0`` frozen at the full model's init, ``B = 0``);

and, on the language model, accumulation over ``K = 4`` micro-batches (the
same examples per update) with ``flora_optax.MultiSteps`` or
``optax.MultiSteps`` around Adafactor without momentum. The quantized states
(issues 18, 20, 22) add momentum and accumulators in 8-/4-bit codes, Flora's
sketch in 8-bit codes, bf16 momentum, ``optax.adamw`` and
``flora_optax.adamw(bits=8 / 4)``, and the SVD-subspace peer
``optax.contrib.galore`` (Adam, or the study's Adafactor momentum, in its
subspace) at the same rank. Rows marked ``ablation`` (those that settled a
default) run only when named or with ``--ablations``. Other optimizers
(issue 28) each come float and wrapped by ``flora_optax.quantized`` (8-bit,
and 4-bit for Muon and Lion): ``optax.contrib.muon``, ``optax.lion``,
``optax.contrib.ademamix`` and ``optax.sgd`` with momentum 0.9. They run
only when named (``--variants muon,muon_8bit,...``), outside the full run's
time, each first measured around its task's centre times its ``lr_factor``.

Tasks: ``lm`` (a 1-layer byte GPT, where momentum does not help),
``lm_deep`` (2 layers, longer windows, more tokens: momentum clearly helps),
``finetune`` (the paper's setting: the byte GPT pretrained once on the
stdlib sources, cached under ``runs/quality_cache``, then fine-tuned on the
pydoc topics), and three small ill-conditioned problems (``regression``,
``mlp``, ``autoencoder``). Every row records its state bytes and its bytes
per parameter of the task's model.

Each configuration trains every (seed, learning rate) pair with one jitted
program (a ``lax.scan`` over steps), run once per pair. A seed fixes the
model init, the data order and the projection key. Each optimizer is reported
at its best learning rate by mean final (held-out) loss; when the best is at
an edge of the grid, the grid is extended on that side. Each row's grid is
centred on its best learning rate in the committed results (``--centres``),
so the full run seldom extends; a row measured for the first time starts at
its task's centre (times its ``lr_factor``). Results go to
``benchmarks/results/quality.{json,md,png}``, merged into an earlier JSON so
that parts can be rerun::

    python -m benchmarks.quality                  # the full study
    python -m benchmarks.quality --resume         # only the rows not yet measured
    python -m benchmarks.quality --quick          # a smoke run (results/quick/)
    python -m benchmarks.quality --tasks lm --variants flora_paper --ratios 4

Modules, by concern: :mod:`.settings` (the study's constants),
:mod:`.tasks`, :mod:`.variants` (the rows' optimizers), :mod:`.training`,
:mod:`.report` (targets, markdown, plot), :mod:`.watchdog` and :mod:`.cli`.
"""

from benchmarks import common

# Before JAX's first computation (the tasks compute when built).
common.avoid_xla_cpu_hang()

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.quality.cli import QUICK, main, parse_args  # noqa: E402,F401
from benchmarks.quality.tasks import TASKS  # noqa: E402,F401
from benchmarks.quality.training import (  # noqa: E402,F401
    best_lr, run_row, train)
# Not the function variants(): the name is its module's.
from benchmarks.quality.variants import flora_chain, runnable  # noqa: E402,F401
# pylint: enable=g-import-not-at-top,wrong-import-position
