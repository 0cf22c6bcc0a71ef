"""The quality study's settings: one place, recorded in the results' meta."""

NAME = 'quality'  # results/quality.{json,md,png}
RATIOS = (2, 4, 8)  # d / r
MOMENTUM = 0.9
ACCUMULATE = 4
LR_FACTORS = (0.5, 1.0, 2.0)  # the grid around each task's centre
MAX_EXTENSIONS = 3  # grid points added at most on an edge
NOISE_MULT = 2.0  # "clearly better": a gap larger than this many noise stds
TARGET_GAP_CLOSED = 0.7
END_LR = 0.1  # the schedule's final learning rate, a fraction of the peak
# Every row's Adafactor. Factoring from 32 makes these small matrices'
# second moments factored, as they are at scale; without the parameter scale,
# zero-initialised weights (biases, LoRA's B) learn at the same rate under
# every optimizer.
ADAFACTOR = dict(multiply_by_parameter_scale=False, min_dim_size_to_factor=32,
                 clipping_threshold=1.0)
RESAMPLE_FRACTION = 8  # resample_every = steps / 8
MAX_HANGS = 2  # a row that hung this many times is skipped by --resume
