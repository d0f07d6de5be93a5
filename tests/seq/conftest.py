"""Tiny offline Hugging Face artefacts for the LM-distillation tests: a byte-level BPE tokenizer with a chat
template (pad == EOS, as SmolLM2's) and a 2-layer Llama using it, both saved as HF folders."""
import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["What is 12 plus 30? Answer with the number only.", "Explain what `json.dumps` does.",
          "Serialize obj to a JSON formatted str.", "hello world, the quick brown fox jumps over the lazy dog"] * 20


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE, vocab_size: int = 300):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                                     pad_token="<|im_end|>", bos_token="<|im_start|>",
                                                     unk_token="<|endoftext|>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_llama(vocab_size: int, layers: int = 2, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                      tie_word_embeddings=True, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    """A 4-layer Llama + the tiny tokenizer, as save_pretrained writes them."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    make_llama(len(tokenizer), layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
