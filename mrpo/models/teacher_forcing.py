"""Teacher-forced passes over prompt + completion through the inner model (no lm_head): the hidden states
that predict each completion token, padded or packed (padding-free, loss.packing). Backbone gets them from
TeacherForcedPasses."""
from __future__ import annotations

import warnings

import torch

from mrpo.models.varlen_attention import KWARG as PACKED_KWARG
from mrpo.models.varlen_attention import (
    PackedSequences,
    base_implementation,
    text_config,
    use_varlen_attention,
)

_PACKING_FALLBACK_WARNED: set[str] = set()   # reasons already warned about (completion_hidden_states(packed=True))


class TeacherForcedPasses:
    """Backbone's teacher-forced forwards (a mixin: needs model, family, is_qwen, pad_token_id,
    _vision_filler and _append_row of Backbone)."""

    def _teacher_forcing_batch(self, batch: dict, completions: list[list[int]], model
                               ) -> tuple[dict, list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """The padded [B, P + T] teacher-forcing layout both forward paths start from (the sharded
        vision filler row appended when needed, see _vision_filler).
        Returns (batch, completions, ids [B, P+T], mask [B, P+T] (left-padded prompt, right-padded
        completion), comp_mask [B, T] bool, P, T)."""
        if len(completions) != batch["input_ids"].shape[0]:
            raise ValueError(f"completion_hidden_states: {len(completions)} completions for a batch of "
                             f"{batch['input_ids'].shape[0]}")
        filler = self._vision_filler(batch, model)
        if filler is not None:   # its empty completion adds no hidden state; its cu_seqlens entry is dropped
            batch, completions = self._append_row(batch, filler), list(completions) + [[]]
        input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        B, P = input_ids.shape
        device = input_ids.device
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long, device=device)
        T = int(lengths.max()) if B else 0
        comp = torch.full((B, T), self.pad_token_id, dtype=torch.long, device=device)
        for i, c in enumerate(completions):
            comp[i, : len(c)] = torch.as_tensor(c, dtype=torch.long, device=device)
        comp_mask = torch.arange(T, device=device)[None, :] < lengths[:, None]        # [B, T]
        ids = torch.cat([input_ids, comp], dim=1)
        mask = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)
        return batch, completions, ids, mask, comp_mask, P, T

    @staticmethod
    def _cu_seqlens(completions: list[list[int]], rows: int, device) -> torch.Tensor:
        """[rows + 1] int32 offsets of each completion's tokens in the packed outputs."""
        cu = torch.zeros(len(completions) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(torch.tensor([len(c) for c in completions], device=device), 0).to(torch.int32)
        return cu[: rows + 1]

    @staticmethod
    def _run(model, inputs: dict) -> torch.Tensor:
        """Final-norm hidden states [rows, S, D] of one forward (see completion_hidden_states)."""
        if getattr(model.get_output_embeddings(), "passthrough", False):
            return model(**inputs).logits              # lm_head returns its input
        return model.model(**inputs).last_hidden_state

    def completion_hidden_states(self, batch: dict, completions: list[list[int]], model=None, packed: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced forward over prompt + completion, without computing logits.

        batch: encode_prompts output (B rows); completions: B lists of token ids; model: the model to
        run (default self.model; e.g. a reference copy of the same family); packed: run the padding-free
        forward instead (packed_completion_hidden_states: same outputs, no padding tokens; when
        packing_unsupported(model), the padded forward runs after a one-time warning).
        Returns hidden [N, D] (final-norm hidden states; row t predicts completion token t; N = total
        completion tokens, packed in batch order), targets [N] int64, cu_seqlens [B+1] int32.
        Gradients flow. Afterwards self.last_padding_fraction = padding tokens / tokens of the forward.
        Two ways to skip the lm_head: when the model's output embedding has `passthrough=True`
        (mrpo.models.parallelize.hidden_states_mode) the root model(...) runs and its "logits" are the
        hidden states, through every FSDP2 hook; otherwise the inner model.model(...) runs, and under
        FSDP2 the caller calls model.unshard() before and model.reshard() after the backward.
        """
        model = self.model if model is None else model
        if packed:
            why = self.packing_unsupported(model)
            if why is None:
                return self.packed_completion_hidden_states(batch, completions, model)
            if why not in _PACKING_FALLBACK_WARNED:   # once per reason, not at every micro-batch
                _PACKING_FALLBACK_WARNED.add(why)
                warnings.warn(f"loss.packing: cannot pack with {why}; running the padded forward instead",
                              stacklevel=2)
        rows = len(completions)
        batch, completions, ids, mask, comp_mask, P, T = self._teacher_forcing_batch(batch, completions, model)
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if self.is_qwen:   # completion tokens are text (0): M-RoPE positions continue after the prompt
            inputs["mm_token_type_ids"] = self._full_mm_token_type_ids(batch, T)
        else:              # 1-D RoPE: positions skip the left padding, exactly as generate computes them
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs.update(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = self._run(model, inputs)[:, P - 1 : P - 1 + T]                          # [B, T, D]
        self._last_tokens = (mask.sum(), mask.numel())                                 # read lazily: no host sync
        comp = ids[:, P:]
        return hidden[comp_mask], comp[comp_mask], self._cu_seqlens(completions, rows, ids.device)

    @property
    def last_padding_fraction(self) -> float | None:
        """Padding tokens / all tokens of the last completion_hidden_states forward (0.0 when packed;
        None before the first). Reading it syncs with the device once."""
        last = getattr(self, "_last_tokens", None)
        if last is None:
            return None
        real, total = last
        return 1.0 - float(real) / total if total else 0.0

    def _full_mm_token_type_ids(self, batch: dict, T: int) -> torch.Tensor:
        """Qwen: mm_token_type_ids [B, P + T] of prompt + completion (completion tokens are text, 0)."""
        mm = batch["mm_token_type_ids"]
        return torch.cat([mm, mm.new_zeros(mm.shape[0], T)], dim=1)

    def packing_unsupported(self, model=None) -> str | None:
        """Why the padding-free forward cannot run on `model` (None: it can). The packed forward switches the
        language model to the varlen attention over its implementation (mrpo.models.varlen_attention),
        which runs these bases unchanged when not packed; another kernel is refused."""
        model = self.model if model is None else model
        attn_text = base_implementation(text_config(model)._attn_implementation)   # the language model packs
        ok = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
        if attn_text not in ok:
            return f"attention implementation {attn_text!r} (packing needs one of {', '.join(ok)})"
        return None

    def packed_completion_hidden_states(self, batch: dict, completions: list[list[int]], model=None
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """completion_hidden_states without padding: the B sequences (prompt without its left padding,
        then the completion) are concatenated into one row [1, L], L = sum of their lengths.

        Same arguments and outputs as completion_hidden_states (hidden [N, D], targets [N] int64,
        cu_seqlens [B+1] int32; equal to the padded forward's up to float rounding). Sets
        last_padding_fraction = 0.0 (no padding token is computed).

        How the sequences stay independent: the model's language model is switched (once, see
        mrpo.models.varlen_attention.use_varlen_attention) to the varlen attention, and the forward gets
        the sequence boundaries as the kwarg `packed_sequences` (PackedSequences: cu_seqlens, max length,
        lengths), which transformers hands to the attention function of every decoder layer; no attention
        mask is passed or built, and no boundary is inferred from the positions.
        Positions: InternVL (1-D RoPE) gets 0..len-1 per sequence, as in the padded forward; Qwen gets the 3
        M-RoPE rows [3, 1, L]: the prompts' from the model's own get_rope_index (it skips padding; once per
        distinct prompt), the completion's continuing one by one after the last prompt token: the padded
        forward's positions (for a batch without images, where the padded forward counts the left padding,
        they differ by a constant per sequence, which RoPE attention does not see).
        Images: pixel_values / image_grid_thw stay in batch order, which is the packed token order.
        Raises RuntimeError when packing_unsupported(model) (the caller uses the padded path)."""
        model = self.model if model is None else model
        rows = len(completions)
        inputs, pick, targets, completions = self._packed_inputs(batch, completions, model)
        hidden = self._run(model, inputs)[0, pick]                                # [N, D]
        L = inputs["input_ids"].shape[1]
        self._last_tokens = (L, L)
        return hidden, targets, self._cu_seqlens(completions, rows, targets.device)

    def _packed_inputs(self, batch: dict, completions: list[list[int]], model
                       ) -> tuple[dict, torch.Tensor, torch.Tensor, list[list[int]]]:
        """The model inputs of the packed forward (one row [1, L] and its PackedSequences, see
        packed_completion_hidden_states), pick [L] bool (the tokens whose hidden states predict the
        completion tokens, in order), targets [N] int64 and the completions (plus the vision filler's empty
        one when appended). Switches `model` to the varlen attention."""
        why = self.packing_unsupported(model)
        if why is not None:
            raise RuntimeError(f"packed_completion_hidden_states: cannot pack with {why}; "
                               f"use completion_hidden_states(packed=False)")
        use_varlen_attention(model)
        batch, completions, ids, mask, comp_mask, P, T = self._teacher_forcing_batch(batch, completions, model)
        real = mask.bool()                                                        # [B, S]; row-major = packed order
        prompt_lengths = batch["attention_mask"].sum(-1).tolist()                 # the boundaries, on the host
        seqs = PackedSequences.from_lengths([p + len(c) for p, c in zip(prompt_lengths, completions)], ids.device)
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if self.is_qwen:
            prompt_pos = self._prompt_mrope(batch)                                               # [3, B, P]
            # completion tokens are text: positions continue one by one after the last prompt token
            comp_pos = prompt_pos[:, :, -1:] + 1 + torch.arange(T, device=ids.device)             # [3, B, T]
            mrope = torch.cat([prompt_pos, comp_pos], dim=-1)                                     # [3, B, S]
            inputs["position_ids"] = mrope[:, real][:, None]                                      # [3, 1, L]
            inputs["mm_token_type_ids"] = self._full_mm_token_type_ids(batch, T)[real][None]
        else:              # position of each real token within its own sequence: restarts at 0 for each one
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1)[real][None]    # [1, L]
        inputs.update(input_ids=ids[real][None], use_cache=False, **{PACKED_KWARG: seqs})   # no attention_mask
        # the hidden state at column P-1+t of the padded layout predicts completion token t (a real token)
        pick = torch.zeros_like(real)
        pick[:, P - 1 : P - 1 + T] = comp_mask
        return inputs, pick[real], ids[:, P:][comp_mask], completions

    def _prompt_mrope(self, batch: dict) -> torch.Tensor:
        """Qwen: the M-RoPE positions [3, B, P] of the prompts (left padding 0) from the model's own
        get_rope_index (reads only the config: safe under FSDP), computed once per distinct prompt (a
        micro-batch repeats each prompt for its G completions; the call costs ~1 ms per row on CPU)."""
        ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
        grid = batch.get("image_grid_thw")
        # a row's images are its runs of image tokens, row-major in image_grid_thw (as get_rope_index reads them)
        run_starts = (mm == 1) & (torch.nn.functional.pad(mm, (1, 0))[:, :-1] != 1)
        first_image = [0] + torch.cumsum(run_starts.sum(-1), 0).tolist()
        grids = grid.tolist() if grid is not None else []
        keys = [(tuple(row), tuple(map(tuple, grids[first_image[b]:first_image[b + 1]])))
                for b, row in enumerate((ids * mask).tolist())]
        distinct: dict = {}
        of_row = torch.tensor([distinct.setdefault(k, len(distinct)) for k in keys], device=ids.device)
        rows = [keys.index(k) for k in distinct]                                  # first row of each distinct prompt
        sub_grid = None
        if grid is not None:
            picked = [i for b in rows for i in range(first_image[b], first_image[b + 1])]
            sub_grid = grid[torch.tensor(picked, dtype=torch.long, device=grid.device)] if picked else None
        pos, _ = self.model.model.get_rope_index(ids[rows], mm_token_type_ids=mm[rows], attention_mask=mask[rows],
                                                 image_grid_thw=sub_grid)                 # [3, U, P]
        return pos[:, of_row]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output embedding weight [V, D] (logits = hidden @ W.T)."""
        return self.model.get_output_embeddings().weight
