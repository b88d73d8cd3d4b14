"""mrpo_kernels: fused linear + MRPO loss and chunked log-probs (torch + Triton), never N x V.

    from mrpo_kernels import LossInputs, mrpo_loss, step_token_weights   # the trainer's entry point
    from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs, mrpo_shaped_advantages
"""
from .fused_mrpo_loss import fused_linear_mrpo_loss, mrpo_loss
from .linear_logprobs import linear_logprobs
from .loss_inputs import LossInputs, step_token_weights
from .shaping import mrpo_shaped_advantages

__all__ = [
    "LossInputs", "fused_linear_mrpo_loss", "linear_logprobs", "mrpo_loss", "mrpo_shaped_advantages",
    "step_token_weights",
]
