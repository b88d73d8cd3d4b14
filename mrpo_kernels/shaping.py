"""The MRPO step-wise advantage shaping rule, defined once (torch) with its Triton twin.

For a token of completion i with group-normalised advantage A_i (paper: "Breaking Failure Cascades"):
  answer correct (R_ans > tau) or token in no step (k = -1)   -> A_hat = A_i
  answer wrong, valid step                                    -> A_hat = credit(A_i)
  answer wrong, invalid step k (0-based) of K > 1 steps       -> A_hat = -exp(1 - k/(K-1)) * |A_i|
  answer wrong, invalid step, K = 1                           -> A_hat = -|A_i|
So the first invalid step is penalised e times more than the last one: early errors start the cascade.
`answer_correct` already encodes R_ans > tau (tau = 0.6 by default, applied by the caller).

credit(A) on the valid steps of a wrong answer is chosen by `valid_step_credit`:
  "abs"     +|A|   the paper's rule (default). A negative A (e.g. from a length penalty) turns positive
                   on exactly these tokens, so the penalty loses its sign there.
  "signed"  A      a negative advantage stays negative; a positive one is kept as in "abs".
  "zero"    0      valid steps of a wrong answer get no gradient from the policy term.

`mrpo_shaped_advantages` is the definition used by the torch backend and the reference loss;
`mrpo_shaped_advantage_tl` is the same arithmetic (fp32) inlined in the Triton loss kernel. Both are
tested against each other and against hand-computed values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# valid_step_credit -> the integer flag of the Triton twin
VALID_STEP_CREDITS = {"abs": 0, "signed": 1, "zero": 2}


def credit_code(valid_step_credit: str) -> int:
    """The Triton flag of `valid_step_credit` (ValueError for an unknown name)."""
    try:
        return VALID_STEP_CREDITS[valid_step_credit]
    except KeyError:
        raise ValueError(
            f"valid_step_credit must be one of {tuple(VALID_STEP_CREDITS)}, got {valid_step_credit!r}"
        ) from None


def mrpo_shaped_advantages(
    advantages: torch.Tensor,
    step_index: torch.Tensor,
    num_steps: torch.Tensor,
    step_valid: torch.Tensor,
    answer_correct: torch.Tensor,
    valid_step_credit: str = "abs",
) -> torch.Tensor:
    """Per-token MRPO advantages A_hat.

    advantages: [N] float, A_i of each token's sequence; step_index: [N] int (0-based k, -1 = no step);
    num_steps: [N] int (K of the token's sequence); step_valid: [N] bool; answer_correct: [N] bool;
    valid_step_credit: "abs" | "signed" | "zero" (module docstring).
    Returns [N] float32 (float64 when `advantages` is float64). Tokens with k >= 0 but K < 2 use the
    K = 1 branch (factor 1).
    """
    code = credit_code(valid_step_credit)
    dtype = torch.float64 if advantages.dtype == torch.float64 else torch.float32
    a = advantages.to(dtype)
    mag = a.abs()
    k = step_index.to(dtype)
    K = num_steps.to(dtype)
    # factor = exp(1 - k/(K-1)) for K > 1, else 1; clamp keeps the unused branch finite
    factor = torch.where(K > 1, torch.exp(1.0 - k / (K - 1.0).clamp_min(1.0)), torch.ones_like(k))
    credit = (mag, a, torch.zeros_like(a))[code]
    wrong_step = torch.where(step_valid.bool(), credit, -factor * mag)
    keep = answer_correct.bool() | (step_index < 0)
    return torch.where(keep, a, wrong_step)


@triton.jit
def mrpo_shaped_advantage_tl(a, k, K, valid, correct, VALID_CREDIT: tl.constexpr):
    """Triton twin of `mrpo_shaped_advantages` for one token (fp32 a; int k, K; bool valid, correct).
    VALID_CREDIT: 0 "abs", 1 "signed", 2 "zero" (VALID_STEP_CREDITS)."""
    mag = tl.abs(a)
    kf = k.to(tl.float32)
    Kf = K.to(tl.float32)
    factor = tl.where(Kf > 1.0, tl.exp(1.0 - kf / tl.maximum(Kf - 1.0, 1.0)), 1.0)
    if VALID_CREDIT == 0:
        credit = mag
    elif VALID_CREDIT == 1:
        credit = a
    else:
        credit = a * 0.0
    wrong_step = tl.where(valid, credit, -factor * mag)
    keep = correct | (k < 0)
    return tl.where(keep, a, wrong_step)
