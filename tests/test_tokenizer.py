"""Tokenizers: sentencepiece trained on the Countdown corpus, and a local Hugging Face directory."""

from __future__ import annotations

import pytest

from megatron_rspo.tasks import countdown as cd
from megatron_rspo.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[cd.CountdownInstance], list[str]]:
    train, test = cd.generate_splits(600, 50, seed=0, num_numbers=(3, 4))
    insts = train + test
    return insts, [cd.format_prompt(i) + cd.sft_completion(i) for i in insts]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory, corpus) -> SentencePieceTokenizer:
    return train_sentencepiece(corpus[1], tmp_path_factory.mktemp("sp") / "tokenizer", vocab_size=64)


def test_sentencepiece_round_trip_and_specials(sp_tok, corpus):
    insts, texts = corpus
    assert (sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id) == (PAD_ID, EOS_ID, BOS_ID)
    assert 16 < sp_tok.vocab_size <= 64
    for inst, text in zip(insts, texts):
        ids = sp_tok.encode(text)
        assert sp_tok.decode(ids) == text
        assert not {sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id} & set(ids)  # no specials added
        prompt, completion = cd.format_prompt(inst), cd.sft_completion(inst)
        assert sp_tok.encode(prompt) + sp_tok.encode(completion) == ids  # SFT may tokenize the halves apart
    for text in ("12 + 3", "  numbers:  1  ", "(9-6)*(8+9)</answer>"):
        assert sp_tok.decode(sp_tok.encode(text)) == text  # whitespace is kept exactly
    ids = sp_tok.encode("3*5+7</answer>")
    assert sp_tok.decode([sp_tok.bos_id, *ids, sp_tok.eos_id, sp_tok.pad_id, sp_tok.pad_id]) == "3*5+7</answer>"
    assert sp_tok.decode([*ids, sp_tok.vocab_size + 5]) == "3*5+7</answer>"  # padded-vocab ids are dropped


def test_sentencepiece_tags_and_digits_are_single_pieces(sp_tok):
    for tag in ("<answer>", "</answer>"):
        assert len(sp_tok.encode(tag)) == 1
    pieces = [sp_tok.id_to_piece(i) for i in sp_tok.encode("target: 123 <answer>45*67</answer>")]
    assert "<answer>" in pieces and "</answer>" in pieces
    assert all(len(p.strip("▁")) == 1 for p in pieces if any(ch.isdigit() for ch in p))


def test_sentencepiece_training_is_deterministic(tmp_path, corpus, sp_tok):
    again = train_sentencepiece(corpus[1], tmp_path / "again", vocab_size=64)
    assert again.pieces() == sp_tok.pieces()
    assert [again.encode(t) for t in corpus[1][:50]] == [sp_tok.encode(t) for t in corpus[1][:50]]
    char = train_sentencepiece(corpus[1], tmp_path / "char", vocab_size=64, model_type="char")
    assert char.decode(char.encode(corpus[1][0])) == corpus[1][0]
    with pytest.raises(ValueError, match="no training text"):
        train_sentencepiece([], tmp_path / "empty")


def test_load_tokenizer_paths(tmp_path, sp_tok):
    loaded = load_tokenizer(sp_tok.model_file)
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.pieces() == sp_tok.pieces()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tokenizer.model").write_bytes(open(sp_tok.model_file, "rb").read())
    assert isinstance(load_tokenizer(data_dir), SentencePieceTokenizer)
    (tmp_path / "empty_dir").mkdir()
    for bad in (tmp_path / "missing.model", tmp_path / "empty_dir"):
        with pytest.raises(ValueError, match="cannot load a tokenizer"):
            load_tokenizer(bad)


def _save_hf_tokenizer(directory, texts: list[str], pad: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>"] if pad else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    extra = {"pad_token": "<pad>"} if pad else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **extra).save_pretrained(directory)


def test_hf_tokenizer_local_directory(tmp_path, corpus):
    texts = corpus[1][:200]
    _save_hf_tokenizer(tmp_path / "nopad", texts, pad=False)
    _save_hf_tokenizer(tmp_path / "pad", texts, pad=True)

    tok = load_tokenizer(tmp_path / "nopad")
    assert isinstance(tok, HFTokenizer)
    assert tok.pad_id == tok.eos_id and tok.bos_id is None and tok.vocab_size > 256
    for text in texts[:20] + ["héllo  wörld\n", cd.format_prompt(corpus[0][0], "chat")]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids and tok.decode(ids) == text
        assert tok.decode([*ids, tok.eos_id, tok.eos_id, tok.vocab_size]) == text

    padded = HFTokenizer(tmp_path / "pad")
    assert padded.pad_id != padded.eos_id
    ids = padded.encode(texts[0])
    assert padded.decode([*ids, padded.eos_id, padded.pad_id]) == texts[0]


def test_hf_generation_config_eos_ids_are_stop_ids(tmp_path, corpus):
    """Qwen3's generation_config.json lists two EOS ids; both end a response (and are dropped by decode)."""
    import json

    _save_hf_tokenizer(tmp_path, corpus[1][:200], pad=True)
    tok = HFTokenizer(tmp_path)
    assert tok.stop_ids == (tok.eos_id,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.pad_id, tok.eos_id, 10**9]}))
    tok = HFTokenizer(tmp_path)
    assert tok.stop_ids == (tok.eos_id, tok.pad_id)  # the tokenizer's first; out-of-vocabulary ids ignored
    ids = tok.encode(corpus[1][0])
    assert tok.decode([*ids, tok.pad_id]) == corpus[1][0]
    (tmp_path / "generation_config.json").write_text("{not json")
    from megatron_rspo.errors import TokenizerError

    with pytest.raises(TokenizerError, match="generation_config.json"):
        HFTokenizer(tmp_path)
