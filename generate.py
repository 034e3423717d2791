"""Text generation with a KV cache: batched prompts of different lengths, greedy or sampled decoding."""
import torch


class KVCache:
    """Keys and values of past tokens, preallocated (B, nkv, max_len, hs) per layer and filled in place.

    Rows may be left-padded: `valid` marks real tokens, so padding is never attended to and each row's
    positions count only its real tokens.
    """

    def __init__(self, cfg, batch, max_len, *, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0                      # slots filled, the same for every row

    def append_valid(self, valid):
        """Mark which of the next (B, T) tokens are real (False for padding); call before the forward."""
        self.valid[:, self.length:self.length + valid.shape[1]] = valid

    def positions_and_mask(self, T):
        S = self.length + T
        valid = self.valid[:, :S]                                            # (B, S)
        positions = (valid.cumsum(-1) - 1).clamp(min=0)[:, self.length:S]   # (B, T)
        q_slot = torch.arange(self.length, S, device=valid.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=valid.device)[None, :]               # (1, S)
        # A query sees real keys up to itself; a padding query sees itself, so no softmax row is empty.
        mask = ((k_slot <= q_slot) & valid[:, None, :]) | (k_slot == q_slot)  # (B, T, S)
        return positions, mask[:, None]                                      # mask (B, 1, T, S)

    def update(self, layer, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]

    def advance(self, T):
        self.length += T

    def truncate(self, length):
        """Forget every slot from `length` on (their keys and values are overwritten by the next tokens)."""
        self.length = length


def sample_next(logits, *, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from last-position logits (B, V): argmax at temperature 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]      # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        # Nucleus: keep the smallest set of top tokens whose probability reaches top_p (the first always).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p              # mass before it >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)                # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, stop_ids, pad_id=0, temperature=0.0, top_k=None,
             top_p=None, generator=None, prompt_lookup=0):
    """Continue each prompt (a list of token-id lists); returns the new ids of each, stop token excluded.

    Prompts are left-padded into one batch so every row's next token sits in the last column; a row stops
    at its first stop id, and the batch stops when all rows have. With `prompt_lookup` > 0, a single prompt
    decoded greedily goes through `generate_with_lookup` instead: the same tokens, fewer forward passes.
    """
    if prompt_lookup and len(prompts) == 1 and temperature == 0:
        return [generate_with_lookup(model, prompts[0], max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                     max_draft=prompt_lookup)]
    device = model.lm_head.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, L - len(prompt):] = torch.tensor(prompt, device=device)
        valid[row, L - len(prompt):] = True
    cache = KVCache(model.config, B, L + max_new_tokens, device=device, dtype=model.embed.weight.dtype)
    stop = torch.tensor(sorted(stop_ids), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        cache.append_valid(valid)
        hidden = model(ids, cache=cache, return_hidden=True)[:, -1]            # (B, C): only the last
        next_ids = sample_next(model.lm_head(hidden), temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)                            # (B,)
        next_ids = next_ids.masked_fill(done, pad_id)
        out.append(next_ids)
        done |= torch.isin(next_ids, stop)
        if done.all():
            break
        ids, valid = next_ids[:, None], torch.ones(B, 1, dtype=torch.bool, device=device)
    new = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    results = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    return results


def draft_from_context(tokens, max_draft, max_ngram=3):
    """Up to `max_draft` tokens that followed the latest earlier occurrence of the last n tokens of
    `tokens` (n = max_ngram down to 1), or [] if none recurs."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + max_draft]
    return []


@torch.no_grad()
def generate_with_lookup(model, prompt, *, max_new_tokens, stop_ids, max_draft):
    """Greedy continuation of one prompt by prompt lookup decoding: the new ids, stop token excluded.

    An extractive answer copies its context, so the tokens that followed the last few tokens' earlier
    occurrence are a good guess of what comes next. One forward pass scores the last token plus up to
    `max_draft` guessed ones; the guesses the model itself would have picked greedily are kept, plus the
    model's own token after them. At batch 1 a pass over 1 + max_draft tokens costs about what a pass over 1
    does (reading, and for 4-bit dequantizing, every weight dominates), so each kept guess is a pass saved:
    bench.py, SmolLM2 NF4 on the CPU, 16 SQuAD prompts, 0.93 answers/s instead of 0.42. In fp32 the tokens
    are exactly greedy's (tests/test_model.py); in bf16 a pass over several tokens rounds differently from a
    pass over one, so a near-tie can flip (81% of those 16 answers were identical).
    """
    device = model.lm_head.weight.device
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens + max_draft, device=device,
                    dtype=model.embed.weight.dtype)
    tokens, out = list(prompt), []
    pending = list(prompt)                                    # tokens not in the cache yet
    while len(out) < max_new_tokens:
        draft = draft_from_context(tokens, min(max_draft, max_new_tokens - len(out) - 1))
        feed = pending + draft
        cache.append_valid(torch.ones(1, len(feed), dtype=torch.bool, device=device))
        hidden = model(torch.tensor([feed], device=device), cache=cache, return_hidden=True)
        # predicted[i]: the greedy token after feed[len(pending) - 1 + i]; (len(draft) + 1,)
        predicted = model.lm_head(hidden[0, len(pending) - 1:]).argmax(-1).tolist()
        n_kept = 0
        while n_kept < len(draft) and draft[n_kept] == predicted[n_kept]:
            n_kept += 1
        cache.truncate(cache.length - (len(draft) - n_kept))  # the rejected guesses' keys and values
        for token in draft[:n_kept] + [predicted[n_kept]]:
            if token in stop_ids:
                return out
            out.append(token)
            tokens.append(token)
        pending = [out[-1]]
    return out
