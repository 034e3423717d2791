"""One small Tokenizer over the three formats Llama-family checkpoints ship: SentencePiece
`tokenizer.model`, Hugging Face `tokenizer.json`, and GPT-2 `vocab.json` + `merges.txt`."""
import json
import os

import sentencepiece
import tokenizers

from errors import UserError

# Pieces that end a turn or a document; every one present in a vocabulary stops generation.
# (Llama 3 Instruct ends turns with <|eot_id|> but documents with <|end_of_text|>; Qwen's
# generation_config lists both <|im_end|> and <|endoftext|>.)
END_PIECES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
# Padding candidates tried when the configured pad is missing or equals eos, in order.
PAD_PIECES = ("<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


def _read_json(path):
    """The parsed file, or {} when it does not exist."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def _content(token):
    """tokenizer_config writes a special token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _gpt2_bpe(directory):
    """GPT-2's byte-level BPE from vocab.json + merges.txt (the regex split and byte map of GPT-2)."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
        os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])  # so the piece written in text maps to its id, 50256
    return tk


class Tokenizer:
    """encode / decode plus the special ids that training and generation need.

    Backed by either a SentencePieceProcessor (`sp`) or a `tokenizers.Tokenizer` (`tk`)."""

    def __init__(self, directory, sp=None, tk=None):
        self.sp, self.tk = sp, tk
        tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
        # Later files override earlier ones: model config < generation config < token maps.
        cfg = {}
        for name in ("config.json", "generation_config.json", "special_tokens_map.json"):
            cfg.update(_read_json(os.path.join(directory, name)))
        cfg.update(tok_cfg)

        def special(kind):  # a token string from the token maps, else an id from the configs
            ids = self.token_id(_content(cfg.get(f"{kind}_token")) or "")
            if ids is None:
                ids = cfg.get(f"{kind}_token_id")
                ids = ids[0] if isinstance(ids, list) else ids
            return ids

        bos, eos = special("bos"), special("eos")
        if sp is not None:
            self.vocab_size = sp.get_piece_size()
            none = lambda i: i if i >= 0 else None  # noqa: E731  SentencePiece says -1 for "absent"
            self.bos_id = none(sp.bos_id()) if bos is None else bos
            self.eos_id = none(sp.eos_id()) if eos is None else eos
            self.add_bos = tok_cfg.get("add_bos_token", True)  # Llama 2 and llama2.c prepend <s>
        else:
            self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
            # GPT-2 ships no configs: like Hugging Face, <|endoftext|> is both its BOS and EOS.
            self.bos_id = self.token_id("<|endoftext|>") if bos is None else bos
            self.eos_id = self.token_id("<|endoftext|>") if eos is None else eos
            # Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor, not via the config.
            adds = bos is not None and tk.encode("a").ids[:1] == [bos]
            self.add_bos = tok_cfg.get("add_bos_token", adds)
        if self.eos_id is None:
            raise UserError(f"{directory}: no end-of-sequence token in the tokenizer or its configs")

        # Stop at eos, at every eos the generation config lists, and at any known end piece.
        gen_eos = cfg.get("eos_token_id") if isinstance(cfg.get("eos_token_id"), list) else []
        self.stop_ids = {self.eos_id, *gen_eos} | ({self.token_id(p) for p in END_PIECES} - {None})

        # A pad id distinct from eos where the vocabulary has one (SentencePiece <unk>/<pad>,
        # SmolLM2's <|endoftext|>), so "pad" never reads as "end" in a batch; pad positions are
        # masked out of attention and loss either way. GPT-2 has no other special token: pad = eos.
        pads = [special("pad"), *(self.token_id(p) for p in PAD_PIECES)]
        if sp is not None:
            pads += [sp.pad_id(), sp.unk_id()]
        self.pad_id = next((p for p in pads if p is not None and p >= 0 and p != self.eos_id), self.eos_id)

        template = tok_cfg.get("chat_template") or ""
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = " ".join(t.get("template", "") for t in template)
        jinja = os.path.join(directory, "chat_template.jinja")  # where transformers >= 4.43 saves it
        if not template and os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if self.token_id("<|im_start|>") is not None:
            self.chat_format = "chatml"
        elif self.token_id("<|start_header_id|>") is not None:
            self.chat_format = "llama3"
        elif "[INST]" in template or (sp is not None and template):
            self.chat_format = "llama2"
        else:
            self.chat_format = "plain"

        # In a model directory every id must have an embedding row: a tokenizer from another model
        # (Llama 2's beside stories260K) would otherwise fail as an IndexError deep inside training.
        rows = _read_json(os.path.join(directory, "config.json")).get("vocab_size")
        if isinstance(rows, int) and self.vocab_size > rows:
            raise UserError(f"{directory}: the tokenizer has {self.vocab_size} tokens but the model's "
                            f"vocab_size is {rows}: tokenizer and weights come from different models")

    def encode(self, text, bos=False):
        """Token ids of `text`, with bos_id first if `bos`. Special tokens written in the text
        (e.g. "<|im_start|>") become their ids with tokenizer.json and GPT-2 backends."""
        if self.sp is not None:
            ids = self.sp.encode(text)
        else:  # add_special_tokens=False: we place BOS ourselves, never the post-processor
            ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids, skip_special=False):
        """Text of `ids`; special tokens appear as their pieces unless `skip_special`."""
        ids = list(ids)
        if self.tk is not None:
            return self.tk.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            return self.sp.decode(ids)  # SentencePiece drops control ids itself
        # SentencePiece renders control ids (<s>, </s>) as nothing: decode the runs between them.
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_id(self, piece):
        """The id of a single-token piece such as "<|eot_id|>", or None if the vocabulary lacks it."""
        if self.sp is not None:
            i = self.sp.piece_to_id(piece)  # unknown pieces map to <unk>: check the round trip
            return i if piece and self.sp.id_to_piece(i) == piece else None
        return self.tk.token_to_id(piece)


def load_tokenizer(path):
    """The tokenizer of a model or tokenizer directory (tokenizer.json preferred when several exist)."""
    found = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
    try:
        if found("tokenizer.json"):
            return Tokenizer(path, tk=tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")))
        if found("tokenizer.model"):
            sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
            return Tokenizer(path, sp=sp)
        if found("vocab.json") and found("merges.txt"):
            return Tokenizer(path, tk=_gpt2_bpe(path))
    except (OSError, RuntimeError, ValueError, TypeError) as err:  # corrupt or unreadable files
        raise UserError(f"{path}: cannot load the tokenizer ({str(err).splitlines()[0]})") from None
    raise UserError(f"{path}: no tokenizer.json, tokenizer.model or vocab.json + merges.txt")
