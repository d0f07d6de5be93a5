"""CharTokenizer: ids of the specials, round trip, decode rules, errors."""
import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.seq.tokenizer import ALPHABET, CharTokenizer


def test_special_ids_and_vocab_size():
    tokenizer = CharTokenizer()
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.vocab_size == 2 + len(ALPHABET) == 51
    assert len(set(ALPHABET)) == len(ALPHABET)


def test_round_trip_over_the_whole_alphabet():
    tokenizer = CharTokenizer()
    ids = tokenizer.encode(ALPHABET)
    assert ids == list(range(2, tokenizer.vocab_size))
    assert tokenizer.decode(ids) == ALPHABET
    assert tokenizer.decode(torch.tensor(ids)) == ALPHABET


def test_decode_skips_pad_and_stops_at_eos():
    tokenizer = CharTokenizer()
    ids = tokenizer.encode("ab") + [0, 1] + tokenizer.encode("cd") + [0]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(ids, stop_at_eos=False) == "abcd"


def test_unknown_character_names_it_and_the_alphabet():
    with pytest.raises(KdlabError, match=r"'A'.*alphabet.*0123456789"):
        CharTokenizer().encode("1A2")


def test_out_of_vocabulary_id_is_an_error():
    with pytest.raises(KdlabError, match="outside the vocabulary"):
        CharTokenizer().decode([2, 99])
