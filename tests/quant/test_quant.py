"""kdlab.quant: quantizer grids, STE gradients, layer swapping, integer export, a QAT step."""
import math

import pytest
import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.quant import (LSQActQuant, MinMaxActQuant, QuantLinear, QuantSpec, dequantized_forward,
                         export, export_max_error, fake_quantize_weight, linear_names, load_exported,
                         quantize_model, quantize_weight, ternary_params, uniform_fake_quant)


# ---------------------------------------------------------------- a toy BERT-like encoder
class SelfAttn(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)
        return att @ v


class Output(nn.Module):
    def __init__(self, h_in, h):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(h_in, h), nn.LayerNorm(h)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.self, self.output = SelfAttn(h), Output(h, h)

    def forward(self, x):
        return self.output(self.self(x), x)


class Intermediate(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.dense = nn.Linear(h, f)

    def forward(self, x):
        return torch.nn.functional.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.attention, self.intermediate, self.output = Attention(h), Intermediate(h, f), Output(f, h)

    def forward(self, x):
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


class ToyBert(nn.Module):
    def __init__(self, vocab=20, h=16, f=32, layers=2, classes=3):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, h)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(h, f) for _ in range(layers))
        self.pooler = nn.Linear(h, h)
        self.classifier = nn.Linear(h, classes)

    def forward(self, ids):
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


EXPECTED_SWAPPED = [f"encoder.layer.{i}.{n}" for i in range(2) for n in (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense")]


# ---------------------------------------------------------------- weight grids
def test_ternary_threshold_and_scale_on_hand_tensor():
    w = torch.tensor([[0.1, -0.2, 0.9, -1.2], [0.0, 0.05, -0.4, 2.0]])
    mean_abs = w.abs().mean()                      # 4.85 / 8 = 0.60625
    delta, alpha = ternary_params(w)
    assert delta.item() == pytest.approx(0.7 * mean_abs.item())     # Δ = 0.424375
    # |W| > Δ: 0.9, 1.2, 2.0  ->  α = 4.1 / 3
    assert alpha.item() == pytest.approx((0.9 + 1.2 + 2.0) / 3)
    q, scale = quantize_weight(w, "ternary")
    assert q.dtype == torch.int8
    assert q.tolist() == [[0, 0, 1, -1], [0, 0, 0, 1]]            # |−0.4| < Δ -> 0
    fq = fake_quantize_weight(w, "ternary")
    a = alpha.item()
    assert torch.allclose(fq, torch.tensor([[0, 0, a, -a], [0, 0, 0, a]]))


def test_ternary_per_channel_uses_row_statistics():
    w = torch.tensor([[0.1, -0.2, 0.9, -1.2], [0.0, 0.05, -0.4, 2.0]])
    delta, alpha = ternary_params(w, per_channel=True)
    assert delta.shape == alpha.shape == (2, 1)
    assert delta[:, 0].tolist() == pytest.approx([0.7 * 2.4 / 4, 0.7 * 2.45 / 4])
    # row 0: Δ = 0.42 -> {0.9, 1.2}; row 1: Δ = 0.42875 -> {2.0}
    assert alpha[:, 0].tolist() == pytest.approx([1.05, 2.0])
    fq = fake_quantize_weight(w, "ternary", per_channel=True)
    for row, a in zip(fq, alpha[:, 0]):
        assert set(row.tolist()) <= {-a.item(), 0.0, a.item()}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_uniform_weights_land_on_integer_grid(bits, per_channel):
    torch.manual_seed(0)
    w = torch.randn(6, 10) * torch.linspace(0.1, 3, 6)[:, None]
    qp = 2 ** (bits - 1) - 1
    q, scale = quantize_weight(w, bits, per_channel)
    assert q.dtype == torch.int8 and int(q.abs().max()) == qp       # max|W| maps to ±Q_p
    if per_channel:
        assert scale.shape == (6, 1)
        assert torch.allclose(scale[:, 0], w.abs().amax(dim=1) / qp)
    else:
        assert scale.shape == () and torch.isclose(scale, w.abs().max() / qp)
    fq = fake_quantize_weight(w, bits, per_channel)
    levels = fq / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert torch.equal(fq, q.float() * scale)
    assert (fq - w).abs().max() <= scale.max() / 2 + 1e-6        # round-to-nearest error bound
    if bits == 2:
        assert set(q.unique().tolist()) <= {-1, 0, 1}               # 2-bit levels {−1, 0, 1}·scale


# ---------------------------------------------------------------- straight-through gradients
def test_clipped_ste_identity_inside_zero_outside():
    x = torch.tensor([-3.0, -1.0, -0.26, 0.0, 0.4, 1.0, 1.5, 5.0], requires_grad=True)
    y = uniform_fake_quant(x, 0.5, -2, 2)                            # clip range [−1, 1]
    assert torch.allclose(y.detach(), torch.tensor([-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0, 1.0]))
    y.backward(torch.arange(1.0, 9.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]


@pytest.mark.parametrize("bits", ["ternary", 2, 8])
def test_weight_ste_passes_gradient_through(bits):
    torch.manual_seed(1)
    w = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    fake_quantize_weight(w, bits, per_channel=True).backward(g)
    assert torch.equal(w.grad, g)                       # every weight lies in the clip range


def test_minmax_activation_range_grid_and_ste():
    aq = MinMaxActQuant(bits=8)
    aq.train()
    aq(torch.tensor([-1.0, 0.5, 3.0]))
    assert aq.running_min.item() == -1.0 and aq.running_max.item() == 3.0
    aq(torch.tensor([-2.0, 4.0]))                                   # EMA, momentum 0.1
    assert aq.running_min.item() == pytest.approx(-1.1) and aq.running_max.item() == pytest.approx(3.1)
    aq.eval()
    scale, zp = aq.qparams()
    assert scale.item() == pytest.approx(4.2 / 255)
    x = torch.tensor([-5.0, -1.0, 0.0, 0.7, 2.0, 9.0], requires_grad=True)
    y = aq(x)
    levels = y.detach() / scale + zp
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.min() >= 0 and levels.max() <= 255
    assert y[2].item() == 0.0                                       # 0 is exactly representable
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_step_gets_scaled_gradient_and_x_clipped_ste():
    aq = LSQActQuant(bits=8)
    qp = 127
    calib = torch.tensor([-0.5, 0.1, 0.3, 1.1])
    aq(calib)                                                       # first call sets the step
    assert aq.step.item() == pytest.approx(2 * calib.abs().mean().item() / math.sqrt(qp))
    s = aq.step.detach()
    x = torch.tensor([-1000.0, -0.3, 0.2, 0.75, 1000.0], requires_grad=True)
    y = aq(x)
    assert y[0].item() == pytest.approx(-128 * s.item()) and y[-1].item() == pytest.approx(qp * s.item())
    assert torch.allclose(y.detach() / s, (y.detach() / s).round(), atol=1e-4)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ eq. 3 summed over elements, times g = 1/sqrt(N·Q_p)
    v = x.detach() / s
    inside = (v > -128) & (v < qp)
    d = torch.where(inside, v.round() - v, torch.where(v <= -128, torch.tensor(-128.0), torch.tensor(127.0)))
    expected = d.sum() / math.sqrt(x.numel() * qp)
    assert aq.step.grad is not None and aq.step.grad.item() == pytest.approx(expected.item(), rel=1e-4)


# ---------------------------------------------------------------- spec and quantize_model
def test_quantize_model_swaps_exactly_the_chosen_layers():
    torch.manual_seed(0)
    model = ToyBert()
    before = {n: type(m) for n, m in model.named_modules()}
    weight = model.encoder.layer[0].attention.self.query.weight
    swapped = quantize_model(model, QuantSpec(weight_bits=4))
    assert swapped == EXPECTED_SWAPPED
    for name, module in model.named_modules():
        if name in swapped:
            assert isinstance(module, QuantLinear)
        elif name in before:
            assert type(module) is before[name]                     # pooler, classifier, LN, emb
    assert isinstance(model.embeddings, nn.Embedding) and type(model.pooler) is nn.Linear
    assert model.encoder.layer[0].attention.self.query.weight is weight   # latent param shared
    assert linear_names(model) == ["pooler", "classifier"]
    model(torch.randint(0, 20, (2, 5)))


def test_quantize_model_subset_of_patterns():
    model = ToyBert()
    swapped = quantize_model(model, QuantSpec(layers=("*.query", "*.value")))
    assert swapped == [f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")]
    assert type(model.encoder.layer[0].attention.self.key) is nn.Linear


def test_unknown_pattern_is_an_error_listing_linears():
    model = ToyBert()
    with pytest.raises(KdlabError, match=r"quant\.layers.*'\*\.q_proj'.*available: .*attention\.self\.query"):
        quantize_model(model, QuantSpec(layers=("*.query", "*.q_proj")))
    assert type(model.encoder.layer[0].attention.self.query) is nn.Linear   # nothing changed


@pytest.mark.parametrize("kwargs, key", [
    ({"weight_bits": 3}, "quant.weight_bits"), ({"weight_bits": "binary"}, "quant.weight_bits"),
    ({"weight_bits": True}, "quant.weight_bits"), ({"activation_bits": 4}, "quant.activation_bits"),
    ({"activation_mode": "ema"}, "quant.activation_mode"), ({"layers": ()}, "quant.layers"),
])
def test_bad_spec_names_the_key(kwargs, key):
    with pytest.raises(KdlabError, match=key.replace(".", r"\.")):
        QuantSpec(**kwargs)


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("spec", [
    QuantSpec(weight_bits="ternary", per_channel=False),
    QuantSpec(weight_bits="ternary", per_channel=True, activation_bits=8),
    QuantSpec(weight_bits=2, per_channel=True, activation_bits=8, activation_mode="lsq"),
    QuantSpec(weight_bits=4),
    QuantSpec(weight_bits=8, per_channel=True, activation_bits=8),
], ids=["tern", "tern-pc-a8", "2b-pc-lsq", "4b", "8b-pc-a8"])
def test_exported_integers_reproduce_fake_quant(spec):
    torch.manual_seed(0)
    model = ToyBert()
    quantize_model(model, spec)
    ids = torch.randint(0, 20, (4, 6))
    model.train()
    model(ids)                                                      # calibrate activation ranges
    exported = export(model)
    qp = 1 if spec.weight_bits == "ternary" else 2 ** (spec.weight_bits - 1) - 1
    for name, entry in exported["layers"].items():
        assert entry["weight_int"].dtype == torch.int8
        assert int(entry["weight_int"].abs().max()) <= qp
        assert entry["scale"].dtype == torch.float32
        assert entry["scale"].shape == ((model.get_submodule(name).out_features, 1) if spec.per_channel else ())
    assert export_max_error(model, ids) <= 1e-6
    model.eval()
    ref = model(ids)
    out = dequantized_forward(model, exported, ids)
    assert torch.allclose(ref, out, atol=1e-6, rtol=0)


def test_load_exported_into_a_model_with_other_latent_weights():
    torch.manual_seed(0)
    spec = QuantSpec(weight_bits="ternary", per_channel=True)
    model, other = ToyBert(), ToyBert()
    other.load_state_dict(model.state_dict())
    quantize_model(model, spec)
    quantize_model(other, spec)
    ids = torch.randint(0, 20, (3, 5))
    exported = export(model)
    for layer in other.modules():
        if isinstance(layer, QuantLinear):
            nn.init.normal_(layer.weight)                           # scramble latent weights
    model.eval(), other.eval()
    assert not torch.allclose(model(ids), other(ids))
    load_exported(other, exported)
    assert torch.allclose(model(ids), other(ids), atol=1e-6, rtol=0)
    with pytest.raises(KdlabError, match="layer names differ"):
        load_exported(_quantized(1), exported)


def _quantized(layers):
    m = ToyBert(layers=layers)
    quantize_model(m, QuantSpec())
    return m


# ---------------------------------------------------------------- a QAT step
@pytest.mark.parametrize("spec", [
    QuantSpec(weight_bits="ternary", per_channel=True, activation_bits=8, activation_mode="lsq"),
    QuantSpec(weight_bits=2, activation_bits=8),
], ids=["ternary-lsq", "2bit-minmax"])
def test_training_through_quantized_model_lowers_loss(spec):
    torch.manual_seed(0)
    model = ToyBert()
    quantize_model(model, spec)
    ids = torch.randint(0, 20, (16, 6))
    target = torch.randint(0, 3, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(ids), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    q = model.encoder.layer[0].attention.self.query
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    if spec.activation_mode == "lsq":
        assert q.act_quant.step.grad is not None


# ---------------------------------------------------------------- the kdlab and Hugging Face BERT encoders
def _bert_linears(prefix, layers):
    return [f"{prefix}encoder.layer.{i}.{name}" for i in range(layers)
            for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense")]


def test_quantize_bert_encoder_then_export_reproduces_it():
    from kdlab.models.encoder import BertEncoderClassifier

    torch.manual_seed(0)
    model = BertEncoderClassifier(vocab_size=30, num_classes=3, hidden=8, layers=2, heads=2, dropout=0.0)
    swapped = quantize_model(model, QuantSpec(weight_bits=4, per_channel=True, activation_bits=8))
    assert swapped == _bert_linears("", 2)
    assert type(model.classifier) is nn.Linear and type(model.embeddings.word_embeddings) is nn.Embedding
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 8, 9, 3]])
    model.train()
    model(ids)  # calibrate the activation ranges
    assert export_max_error(model, ids) <= 1e-5


def test_quantize_hf_encoder_swaps_the_same_layers():
    pytest.importorskip("transformers")
    from kdlab.models.hf_encoder import hf_encoder

    model = hf_encoder(input_shape=(6,), num_classes=3, config=dict(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16))
    swapped = quantize_model(model, QuantSpec(weight_bits="ternary"))
    assert swapped == _bert_linears("backbone.", 2)
    assert type(model.classifier) is nn.Linear
    out = model(torch.tensor([[2, 5, 6, 3, 0, 0]]))
    assert out.shape == (1, 3) and torch.isfinite(out).all()
