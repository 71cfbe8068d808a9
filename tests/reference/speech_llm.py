"""LLM-SRT's input assembly in PyTorch, for parity tests of the speech LLM."""

import torch


def torch_embeds(torch_parts, mel, tokens, text_mask, left_pad_speech=False):
    """LLM-SRT's assembly: speech embeddings then the text embeddings, in `inputs_embeds`."""
    t_enc, t_proj, t_llm = torch_parts
    with torch.no_grad():
        speech = t_proj(t_enc(torch.from_numpy(mel)).last_hidden_state)
        text = t_llm.get_input_embeddings()(torch.from_numpy(tokens).long())
        B, Qs = speech.shape[:2]
        mask = torch.cat([torch.ones(B, Qs, dtype=torch.long), torch.from_numpy(text_mask).long()], 1)
        embeds = torch.cat([speech, text], 1)
        if left_pad_speech:  # reference decoding layout: [pad][speech][prompt]
            order = torch.argsort(mask, dim=1, stable=True)
            embeds = torch.gather(embeds, 1, order[..., None].expand_as(embeds))
            mask = torch.gather(mask, 1, order)
    return embeds, mask
