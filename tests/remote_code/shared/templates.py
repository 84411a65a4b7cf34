"""Chat templates and the text side of ``predict_forward`` (test model, written for sa2va-convert):
the prompt, greedy decoding, and the step from each generated ``[SEG]`` to its mask.

The same file is shipped with every test family (it lives once, in shared/).

A template says how one user turn is wrapped and which tokens end the answer. The strings follow
the spirit of the public chat formats; they are not byte-for-byte copies of any upstream template.
"""

import inspect

import torch

PROMPT_TEMPLATE = {
    "qwen_chat": {
        "system": "<|im_start|>system\n{system}<|im_end|>\n",
        "instruction": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "stop_words": ["<|im_end|>", "<|endoftext|>"],
    },
    "internlm2_chat": {
        "system": "<|im_start|>system\n{system}<|im_end|>\n",
        "instruction": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "stop_words": ["<|im_end|>"],
    },
    "phi3_chat": {
        "system": "<|system|>\n{system}<|end|>\n",
        "instruction": "<|user|>\n{input}<|end|>\n<|assistant|>\n",
        "stop_words": ["<|end|>", "<|endoftext|>"],
    },
    # LLaVA-1.5 (Vicuna): a bare user turn, no system prompt; the answer ends at </s>
    "vicuna": {
        "system": "{system} ",
        "instruction": "USER: {input} ASSISTANT:",
        "stop_words": ["</s>"],
    },
}


def get_template(name):
    if name not in PROMPT_TEMPLATE:
        raise KeyError(f"unknown template {name!r}; known: {sorted(PROMPT_TEMPLATE)}")
    return PROMPT_TEMPLATE[name]


def build_prompt(template, text, image_tokens, system=None):
    """Wrap ``text`` in one user turn; ``<image>`` becomes ``image_tokens`` (prepended when absent)."""
    if image_tokens:
        text = text.replace("<image>", image_tokens) if "<image>" in text else image_tokens + "\n" + text
    prompt = template["instruction"].format(input=text)
    return (template["system"].format(system=system) if system else "") + prompt


def token_id(tokenizer, token):
    """Id of a single-token string, or None when the tokenizer does not know it as one token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, list):
        tid = tid[0] if len(tid) == 1 else None
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def stop_token_ids(tokenizer, template):
    ids = {token_id(tokenizer, w) for w in list(template["stop_words"]) + ["<|im_end|>"]}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.discard(None)
    return ids


def _step(body, head, embeds, cache):
    """One forward of a decoder body + head; returns (logits of the last position, its hidden state, cache).

    transformers 5.x calls the cache ``cache`` where 4.x called it ``past_key_values``."""
    name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    out = body(inputs_embeds=embeds, use_cache=True, return_dict=True, **{name: cache})
    new_cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
    hidden = out["last_hidden_state"][:, -1]
    logits = head(hidden.to(head.weight.device))
    return logits[0].float(), hidden[0], new_cache


@torch.no_grad()
def greedy_generate(body, head, embed_tokens, inputs_embeds, max_new_tokens, stop_ids, seg_id):
    """Greedy decoding (deterministic) with a KV cache.

    Returns the generated ids (the stop token included when met) and, for every generated
    ``[SEG]`` followed by another token, the last hidden state at the position of that ``[SEG]``
    (the state the model computes when the ``[SEG]`` token is fed back in). The last token is
    never fed back, as in transformers' ``generate``, so a ``[SEG]`` that ends a capped answer
    gets no mask: upstream reads the states over ``sequences[0][:-1]``
    (``projects/sa2va/hf/models/modeling_sa2va_chat.py`` lines 751-756, bytedance/Sa2VA 9832e1a)."""
    ids, seg_states, cache, embeds = [], [], None, inputs_embeds
    while True:
        logits, hidden, cache = _step(body, head, embeds, cache)
        if ids and ids[-1] == seg_id:
            seg_states.append(hidden)
        if len(ids) >= max_new_tokens or (ids and ids[-1] in stop_ids):
            break
        nxt = int(logits.argmax())
        ids.append(nxt)
        if len(ids) >= max_new_tokens or nxt in stop_ids:
            break  # the last token is not fed back (see above)
        weight = embed_tokens.weight
        embeds = embed_tokens(torch.tensor([[nxt]], device=weight.device))
    return ids, seg_states


def generate_with_masks(model, body, head, inputs_embeds, tokenizer, template, seg_id, frames):
    """Greedy decoding (above) of ``model``'s answer, then one mask per generated ``[SEG]``: its hidden
    state through ``model.text_hidden_fcs`` into ``model.grounding_encoder.predict_masks``.

    Returns the generated ids and the masks (none without frames)."""
    ids, seg_states = greedy_generate(body, head, body.get_input_embeddings(), inputs_embeds, model.max_new_tokens,
                                      stop_token_ids(tokenizer, template), seg_id)
    return ids, masks_from_seg_states(model, seg_states, frames)


def masks_from_seg_states(model, seg_states, frames):
    """One mask per ``[SEG]`` hidden state: through ``model.text_hidden_fcs`` into
    ``model.grounding_encoder.predict_masks`` (none without frames)."""
    if not (seg_states and frames):
        return []
    fcs = next(model.text_hidden_fcs.parameters())
    seg_embeds = model.text_hidden_fcs(torch.stack(seg_states).to(fcs.device, fcs.dtype))
    return model.grounding_encoder.predict_masks(frames, seg_embeds, frames[0].size)
