# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""flora_optax: memory-cheap optimizer states for Optax.

Two compressors that compose: Flora's random projection (Hao, Cao and Mou,
ICML 2024) keeps the momentum and the gradient accumulator of every matrix as
a random sketch ``G Pᵀ`` of size ``r·max(n, m)`` instead of ``n·m``,
regenerating ``P`` from a key; block-wise quantization (``bits=8`` or ``4``)
keeps a state, sketched or not, in 8- or 4-bit codes, and both moments of
:func:`adamw`.
"""

from flora_optax._accumulation import MultiSteps as MultiSteps
from flora_optax._accumulation import MultiStepsState as MultiStepsState
from flora_optax._accumulation import accumulate_gradients as accumulate_gradients
from flora_optax._adam import ScaleByAdamState as ScaleByAdamState
from flora_optax._adam import adamw as adamw
from flora_optax._adam import scale_by_adam as scale_by_adam
from flora_optax._alias import flora as flora
from flora_optax._keys import cycle_key as cycle_key
from flora_optax._momentum import CompressedMomentumState as CompressedMomentumState
from flora_optax._momentum import TransferStabilityWarning as TransferStabilityWarning
from flora_optax._momentum import compressed_momentum as compressed_momentum
from flora_optax._projection import LeafPlan as LeafPlan
from flora_optax._projector import Projector as Projector
from flora_optax._quantization import QuantizedArray as QuantizedArray
from flora_optax._quantization import QuantizedFormat as QuantizedFormat
from flora_optax._quantization import code_values as code_values
from flora_optax._quantized import from_float_state as from_float_state
from flora_optax._quantized import quantized as quantized
from flora_optax._quantized import to_float_state as to_float_state
from flora_optax._types import DimensionNumbers as DimensionNumbers
from flora_optax._sharding import state_shardings as state_shardings

__version__ = '0.4.0.dev0'

__all__ = [
    'CompressedMomentumState',
    'DimensionNumbers',
    'LeafPlan',
    'MultiSteps',
    'MultiStepsState',
    'Projector',
    'QuantizedArray',
    'QuantizedFormat',
    'ScaleByAdamState',
    'TransferStabilityWarning',
    'accumulate_gradients',
    'adamw',
    'code_values',
    'compressed_momentum',
    'cycle_key',
    'flora',
    'from_float_state',
    'quantized',
    'scale_by_adam',
    'state_shardings',
    'to_float_state',
]
