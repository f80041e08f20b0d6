"""Share the LoRA you made (docs/architecture.md §5.1): exported files carry modelspec / kohya metadata,
and nothing of the machine that trained them (no absolute path, no `${VAR}` value); LoKr files load
into diffusers through load_adapter_file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

from wan_assets.core.config import parse_config
from wan_assets.core.data.cache import index_path, load_index
from wan_assets.core.model.lora import add_lora, load_adapter_file, load_lora_into
from wan_assets.core.train.loop import train

from .conftest import tiny_job_raw

SECRET = "token-9f8e7d6c"  # a variable's value that must not leave the machine


def _job(clips: Path, model: Path, out: Path, monkeypatch: pytest.MonkeyPatch, **network) -> dict:
    monkeypatch.setenv("WAN_TEST_CLIPS", str(clips))
    monkeypatch.setenv("WAN_TEST_OUT", str(out))
    monkeypatch.setenv("WAN_TEST_TOKEN", SECRET)
    monkeypatch.setenv("WAN_TEST_ACCUMULATE", "1")
    raw = tiny_job_raw(clips, model, steps=2)
    raw["meta"] = {"description": "made with ${WAN_TEST_TOKEN}"}
    process = raw["config"]["process"][0]
    process["datasets"][0]["folder_path"] = "${WAN_TEST_CLIPS}"
    process["training_folder"] = "${WAN_TEST_OUT}/runs"
    process["save"]["save_every"] = 1
    process["sample"] = None
    del process["train"]["gradient_accumulation"]  # the same key in ai-toolkit's spelling, from a variable
    process["train"]["gradient_accumulation_steps"] = "${WAN_TEST_ACCUMULATE}"
    process["network"].update(network)
    return raw


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_exported_files_carry_standard_metadata_and_nothing_local(
    tmp_path, tiny_cache, clips_dir, tiny_model_dir, monkeypatch
) -> None:
    job = parse_config(_job(clips_dir, tiny_model_dir, tmp_path, monkeypatch), workdir=tiny_cache).job
    result = train(job, tiny_cache / "cache")
    exported = sorted(result.files.root.glob("*.safetensors"))
    assert len(exported) == 6  # two experts x (steps 1, 2, final)

    local = [str(tmp_path), str(clips_dir), str(tiny_model_dir), str(tiny_cache), str(Path.home()), SECRET]
    for path in exported:
        data = path.read_bytes()
        for text in local:
            assert text.encode() not in data, (path.name, text)

    final = _metadata(result.final_loras["high_noise"])
    index = load_index(index_path(tiny_cache / "cache", job))
    network = job.process.network
    expected = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "wan2.2-i2v-14b/lora",
        "modelspec.trigger_phrase": "sks",
        "modelspec.resolution": "64x64",
        "modelspec.timestep_range": "900,1000",
        "ss_base_model_version": "wan22_14b_i2v",
        "ss_sd_model_name": tiny_model_dir.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.linear),
        "ss_steps": "2",
        "ss_resolution": "(64, 64)",
        "ss_num_frames": str(job.process.datasets[0].num_frames),
        "ss_dataset_hash": index.identity(),
        "wan_assets.expert": "high_noise",
    }
    assert {k: final.get(k) for k in expected} == expected
    alphas = {
        v.item() for k, v in load_file(str(result.final_loras["high_noise"])).items() if k.endswith(".alpha")
    }
    assert alphas == {float(final["ss_network_alpha"])}  # the alpha schedule's alpha in force
    assert _metadata(result.final_loras["low_noise"])["modelspec.timestep_range"] == "0,900"
    assert _metadata(result.files.lora("high_noise", 1))["ss_steps"] == "1"
    assert json.loads(final["ss_datasets"])[0]["num_frames"] == job.process.datasets[0].num_frames

    config = final["wan_assets.config"]
    assert final["ss_config_hash"] == hashlib.sha256(config.encode()).hexdigest()
    process = yaml.safe_load(config)["config"]["process"][0]
    assert process["datasets"][0]["folder_path"] == "${WAN_TEST_CLIPS}"  # as written, not the value
    assert process["training_folder"] == "${WAN_TEST_OUT}/runs"
    assert process["train"]["gradient_accumulation"] == "${WAN_TEST_ACCUMULATE}"  # ai-toolkit's alias
    assert process["model"]["name_or_path"] == "<model.name_or_path>"
    assert yaml.safe_load(config)["meta"] == {"description": "made with ${WAN_TEST_TOKEN}"}


def test_full_rank_lokr_declares_the_scale_it_is_applied_with_and_loads_in_diffusers(
    tmp_path, tiny_cache, clips_dir, tiny_model_dir, monkeypatch
) -> None:
    lokr = {"type": "lokr", "lokr_full_rank": True, "lokr_factor": 4, "linear_alpha": 3.0}
    raw = _job(clips_dir, tiny_model_dir, tmp_path, monkeypatch, **lokr, alpha_schedule={"enabled": False})
    raw["config"]["process"][0]["model"]["model_kwargs"] = {
        "train_high_noise": True,
        "train_low_noise": False,
    }
    job = parse_config(raw, workdir=tiny_cache).job
    result = train(job, tiny_cache / "cache")
    path = result.final_loras["high_noise"]
    metadata, state = _metadata(path), load_file(str(path))
    rank = job.process.network.linear
    # Both Kronecker factors whole: tools apply scale 1, the trained alpha / rank is inside lokr_w1.
    assert not any(k.endswith(("_a", "_b")) for k in state)
    assert {state[k].item() for k in state if k.endswith(".alpha")} == {float(rank)}
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == str(rank)
    assert metadata["wan_assets.trained_alpha"] == "3"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "factor": "4", "full_matrix": "True"}
    assert "load_adapter_file" in metadata["modelspec.description"]

    # A diffusers user's transformer, loaded by diffusers alone, gets the adapter from the file.
    theirs = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    assert load_adapter_file(theirs, path) == rank
    ours = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    add_lora(ours, job.process.network, "default", seed=5)
    load_lora_into(ours, path, "default")
    base = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 36, 2, 8, 8, generator=g),
        torch.tensor([950]),
        torch.randn(1, 5, 32, generator=g),
    )
    with torch.no_grad():
        got, want, plain = (m(*inputs, return_dict=False)[0] for m in (theirs, ours, base))
    assert (got - want).abs().max() == 0 and (got - plain).abs().max() > 0


def test_a_file_without_network_metadata_is_a_clear_error(tmp_path, tiny_model_dir) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "lokr.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lokr_w1": torch.ones(2, 2),
            "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0),
        },
        path,
    )
    theirs = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    with pytest.raises(ValueError, match="needs its ss_network_dim metadata"):
        load_adapter_file(theirs, path)
