"""Family detection from config.json: the refusal of remote code and of unknown families."""

from __future__ import annotations

import json

import pytest

from capfilt.model.families import Family, detect, expect_role
from tests.model import tiny_models


def write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("config, family", [
    ({"model_type": "clip"}, Family("clip", "scorer", "CLIPModel", "clip")),
    ({"model_type": "siglip"}, Family("siglip", "scorer", "SiglipModel", "siglip")),
    ({"model_type": "siglip2"}, Family("siglip2", "scorer", "Siglip2Model", "siglip")),
    ({"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"]},
     Family("blip", "scorer", "BlipForImageTextRetrieval", "blip-itm")),
    ({"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]},
     Family("blip", "captioner", "BlipForConditionalGeneration", "blip")),
    ({"model_type": "blip-2"}, Family("blip-2", "captioner", "Blip2ForConditionalGeneration", "generate")),
    ({"model_type": "instructblip"},
     Family("instructblip", "captioner", "InstructBlipForConditionalGeneration", "generate")),
    ({"model_type": "qwen2_vl"}, Family("qwen2_vl", "captioner", "Qwen2VLForConditionalGeneration", "generate")),
    ({"model_type": "qwen2_5_vl"},
     Family("qwen2_5_vl", "captioner", "Qwen2_5_VLForConditionalGeneration", "generate")),
    ({"model_type": "smolvlm"}, Family("smolvlm", "captioner", "SmolVLMForConditionalGeneration", "generate")),
    ({"model_type": "paligemma"},
     Family("paligemma", "captioner", "PaliGemmaForConditionalGeneration", "generate")),
    ({"model_type": "florence2"},
     Family("florence2", "captioner", "Florence2ForConditionalGeneration", "generate")),
    # a remote-code config of a family transformers ships loads with the native class
    ({"model_type": "llava", "auto_map": {"AutoModel": "modeling_x.X"}},
     Family("llava", "captioner", "LlavaForConditionalGeneration", "generate")),
])
def test_family_from_config(tmp_path, config, family):
    assert detect(write_config(tmp_path / "m", config)) == family


def test_the_tiny_folders_are_detected(tmp_path):
    assert detect(tiny_models.clip_dir(tmp_path / "clip")).class_name == "CLIPModel"
    assert detect(tiny_models.llava_dir(tmp_path / "llava")).class_name == "LlavaForConditionalGeneration"


def test_remote_code_is_refused_and_says_so(tmp_path):
    folder = write_config(tmp_path / "custom", {"model_type": "my_vlm", "architectures": ["MyVLM"],
                                                "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                                                             "AutoModelForCausalLM": "modeling_my.MyVLM"}})
    (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="asks for remote code .* own code is refused for safety"):
        detect(folder)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "not_a_model"}, "'not_a_model' is not a transformers model"),
    ({"model_type": "bert"}, "'bert' is not a supported captioner or scorer"),
    ({"model_type": "blip", "architectures": ["BlipForQuestionAnswering"]}, "must be BlipForImageTextRetrieval"),
    ({}, "None is not a transformers model"),
])
def test_unknown_families_are_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        detect(write_config(tmp_path / "m", config))


def test_missing_or_broken_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        detect(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        detect(tmp_path)


def test_roles_are_checked(tmp_path):
    family = detect(write_config(tmp_path / "m", {"model_type": "clip"}))
    with pytest.raises(ValueError, match="CLIPModel \\(clip\\) is a scorer, not a captioner"):
        expect_role(family, "captioner", tmp_path / "m")
