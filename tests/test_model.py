"""The vanilla GPT: deterministic from the seed, causal, tied or untied, GPT-2 sized preset."""

import torch

from paratrain.models.gpt import PRESETS, build_model, count_params


def test_initialisation_depends_only_on_the_seed():
    torch.manual_seed(999)  # the global RNG state must not matter
    a = build_model("tiny", seed=1)
    torch.manual_seed(5)
    b = build_model("tiny", seed=1)
    c = build_model("tiny", seed=2)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_attention_is_causal():
    model = build_model("tiny", seed=0).eval()
    x = torch.randint(0, 256, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :12], model(y)[:, :12], atol=1e-6)
        assert not torch.allclose(model(x)[:, 12:], model(y)[:, 12:])


def test_tied_and_untied_head():
    tied = build_model("tiny", seed=0)
    untied = build_model("tiny", seed=0, tie_embeddings=False)
    assert tied.head.weight is tied.wte.weight
    assert untied.head.weight is not untied.wte.weight
    cfg = PRESETS["tiny"]
    assert count_params(untied) - count_params(tied) == cfg.vocab_size * cfg.d_model


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = build_model("gpt2", seed=0)
    n = count_params(model)
    # 124.4M with GPT-2's 50257 tokens; the vocabulary is padded to 50304 (+47 * 768).
    assert n == 124_439_808 + 47 * 768


def test_small_preset_is_a_few_million_parameters():
    assert 2e6 < count_params(build_model("small", seed=0)) < 6e6
