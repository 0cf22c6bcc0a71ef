"""The quality study's settings: one place, recorded in the results' meta."""

NAME = 'quality'  # results/quality.{json,md,png}
RATIOS = (2, 4, 8)  # d / r
MOMENTUM = 0.9
ACCUMULATE = 4
LR_FACTORS = (0.5, 1.0, 2.0)  # the grid around each task's centre
MAX_EXTENSIONS = 3  # grid points added at most on an edge
NOISE_MULT = 2.0  # "clearly better": a gap larger than this many noise stds
TARGET_GAP_CLOSED = 0.7
# The quantized states' targets: the fraction of momentum's benefit (the
# no-momentum loss minus momentum's) that each row keeps, where the benefit
# is clear; and the rows that should be within the noise of their float32
# reference.
BENEFIT_TARGETS = (('momentum_8bit', 0.9), ('momentum_4bit', 0.75),
                   ('adafactor_bf16', 0.9))
WITHIN_NOISE_TARGETS = (('adamw_8bit', 'adamw'),
                        ('multisteps_8bit', 'multisteps_optax'),
                        ('multisteps_4bit', 'multisteps_optax'))
END_LR = 0.1  # the schedule's final learning rate, a fraction of the peak
# Every row's Adafactor. Factoring from 32 makes these small matrices'
# second moments factored, as they are at scale; without the parameter scale,
# zero-initialised weights (biases, LoRA's B) learn at the same rate under
# every optimizer.
ADAFACTOR = dict(multiply_by_parameter_scale=False, min_dim_size_to_factor=32,
                 clipping_threshold=1.0)
RESAMPLE_FRACTION = 8  # resample_every = steps / 8
MAX_HANGS = 2  # a row that hung this many times is skipped by --resume
