"""`backend: vllm` of `silkie annotate sample`, against a stand-in of vLLM's offline API (`LLM`, `SamplingParams`,
`RequestOutput`): vLLM itself cannot be installed beside this stack (see the module's docstring). What is checked is
our side: the backend choice, the prompt text per family with one unexpanded image placeholder, the pictures as
PIL images, one seed per answer (the same seeds as the transformers backend), an adapter merged once, and the
answers written in order."""

from __future__ import annotations

import sys
import textwrap

import pytest
from PIL import Image

from silkie.config import ModelSection, RecipeError
from silkie.config.annotate import PoolModel
from silkie.tools.annotate.cli import main
from silkie.tools.annotate.files import read_jsonl
from silkie.tools.annotate.sample import answer_seed
from silkie.tools.annotate.vllm_backend import choose_backend
from silkie.tools.cli import ToolError

from .data_fixtures import synthetic_instructions, write_jsonl

STANDIN = textwrap.dedent(
    '''
    """A recording stand-in of vLLM's offline API (the parts silkie uses)."""
    from dataclasses import dataclass, field

    ENGINES = []

    @dataclass
    class SamplingParams:
        temperature: float = 1.0
        top_p: float = 1.0
        max_tokens: int = 16
        seed: int = None
        stop_token_ids: list = None
        skip_special_tokens: bool = True

    @dataclass
    class CompletionOutput:
        text: str
        token_ids: list
        finish_reason: str = "stop"

    @dataclass
    class RequestOutput:
        prompt_token_ids: list
        outputs: list

    class LLM:
        def __init__(self, model, **kwargs):
            self.model, self.kwargs, self.requests = model, kwargs, []
            ENGINES.append(self)

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            assert len(sampling_params) == len(prompts)
            self.requests += list(zip(prompts, sampling_params))
            outs = []
            for prompt, params in zip(prompts, sampling_params):
                image = prompt["multi_modal_data"]["image"][0]
                text = f" {image.size[0]}x{image.size[1]} seed={params.seed} t={params.temperature} "
                outs.append(RequestOutput(list(range(len(prompt["prompt"]))), [CompletionOutput(text, [1, 2, 3])]))
            return outs
    '''
)


@pytest.fixture
def standin_vllm(tmp_path, monkeypatch):
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text(STANDIN)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    yield
    sys.modules.pop("vllm", None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from silkie.dev.tiny_gemma3 import build_tiny_gemma3
    from silkie.dev.tiny_hf_vlm import build_tiny_llava, build_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("vllm")
    write_jsonl(root / "instructions.jsonl", synthetic_instructions(root, n=5, seed=0))
    build_tiny_qwen2_vl(root / "qwen2-vl")
    build_tiny_llava(root / "llava")
    build_tiny_gemma3(root / "gemma3")
    return root


def test_backend_choice(folder, standin_vllm, monkeypatch):
    model = PoolModel(path=str(folder / "qwen2-vl"))
    assert choose_backend(PoolModel(path=model.path, backend="transformers"), "auto") == "transformers"
    assert choose_backend(PoolModel(path=model.path, backend="vllm"), "auto") == "vllm"
    assert choose_backend(model, "cpu") == "transformers"  # auto: vLLM only with a GPU
    with pytest.raises(ToolError, match=r"pool model qwen2-vl: backend vllm: pool.device is cpu"):
        choose_backend(PoolModel(path=model.path, backend="vllm"), "cpu")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith("site")])
    sys.modules.pop("vllm", None)
    with pytest.raises(ToolError, match=r"vllm is not installed"):
        choose_backend(PoolModel(path=model.path, backend="vllm"), "auto")


def test_sample_with_vllm_writes_its_answers_with_per_answer_seeds(folder, standin_vllm, tmp_path):
    from silkie.tools.common import load_codec_from

    pool = tmp_path / "pool.yaml"
    pool.write_text(
        f"models:\n  - {{path: {folder / 'qwen2-vl'}, backend: vllm, temperature: 0.5, max_new_tokens: 7}}\n"
        f"  - {{path: {folder / 'llava'}, backend: vllm, temperature: 0}}\n"
        "answers_per_instruction: 2\nseed: 3\n"
    )
    out = tmp_path / "out"
    argv = ["sample", "--pool", str(pool), "--instructions", str(folder / "instructions.jsonl")]
    assert main([*argv, "--images", str(folder / "vlf" / "merged_images.zip"), "--out", str(out), "--no-progress"]) == 0
    import vllm

    engines = {engine.model.split("/")[-1]: engine for engine in vllm.ENGINES}
    assert sorted(engines) == ["llava", "qwen2-vl"]
    assert engines["qwen2-vl"].kwargs == {"dtype": "auto", "trust_remote_code": False}
    answers = list(read_jsonl(out / "answers.jsonl"))
    assert len(answers) == 10
    instructions = {r["id"]: r for r in read_jsonl(out / "instructions.jsonl")}
    for name, placeholder in (("qwen2-vl", "<|vision_start|><|image_pad|><|vision_end|>"), ("llava", "<image>")):
        codec = load_codec_from(folder / name)
        requests = engines[name].requests
        assert len(requests) == 5
        for (request, params), answer in zip(requests, [a for a in answers if a["model"] == name]):
            row = instructions[answer["id"]]
            assert request["prompt"] == codec.prompt_text(row["prompt"], ["image"])
            assert request["prompt"].count(placeholder) == 1
            picture = request["multi_modal_data"]["image"][0]
            assert params.seed == answer_seed(3, row["id"], name)
            assert (
                answer["response"] == f"{picture.size[0]}x{picture.size[1]} seed={params.seed} t={params.temperature}"
            )
        temperature = 0.5 if name == "qwen2-vl" else 0.0
        assert {(p.temperature, p.max_tokens) for _, p in requests} == {(temperature, 7 if temperature else 256)}
    # a rerun asks vLLM nothing more
    vllm.ENGINES.clear()
    assert main([*argv, "--images", str(folder / "vlf" / "merged_images.zip"), "--out", str(out), "--no-progress"]) == 0
    assert vllm.ENGINES == [] and len(list(read_jsonl(out / "answers.jsonl"))) == 10


def test_a_template_that_writes_bos_does_not_give_vllm_two(folder, standin_vllm, tmp_path):
    """Gemma's template opens with `<bos>` and its tokenizer adds one to a text (vLLM tokenizes text prompts with
    special tokens): the prompt handed to vLLM leaves the template's out, so the model reads one, as in training."""
    from silkie.models.loading import load_tokenizer
    from silkie.tools.annotate.vllm_backend import VllmResponder

    responder = VllmResponder(PoolModel(path=str(folder / "gemma3"), backend="vllm"), tmp_path)
    prompt = responder.prompt_text("What is this?")
    codec = load_tokenizer(ModelSection(path=str(folder / "gemma3"), family="gemma3"))
    assert prompt.startswith("<start_of_turn>user\n<start_of_image>") and prompt.count("<start_of_image>") == 1
    ids = codec.tokenizer(prompt)["input_ids"]  # as vLLM tokenizes it
    assert ids[:2] == [codec.tokenizer.bos_token_id, codec.tokenizer.convert_tokens_to_ids("<start_of_turn>")]
    assert ids == codec.tokenizer(codec.prompt_text("What is this?", ["image"], generation=True),
                                  add_special_tokens=False)["input_ids"]  # fmt: skip
    llava = VllmResponder(PoolModel(path=str(folder / "llava"), backend="vllm"), tmp_path)  # its template writes none
    assert llava.prompt_text("What is this?").startswith("USER: <image>")


def test_an_adapter_is_merged_once_and_qwen_vl_needs_its_remote_code(folder, standin_vllm, tmp_path):
    from peft import LoraConfig, get_peft_model

    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint
    from silkie.tools.annotate.vllm_backend import servable_folder
    from silkie.tools.common import load_model

    base = load_model(folder / "qwen2-vl", None)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    model = PoolModel(path=str(folder / "qwen2-vl"), adapter=str(tmp_path / "adapter"), name="policy")
    merged = servable_folder(model, tmp_path / "out")
    assert merged == tmp_path / "out" / "merged" / "policy" and (merged / "config.json").is_file()
    stamp = (merged / "config.json").stat().st_mtime_ns
    assert servable_folder(model, tmp_path / "out") == merged and (merged / "config.json").stat().st_mtime_ns == stamp
    assert servable_folder(PoolModel(path=model.path), tmp_path / "out") == folder / "qwen2-vl"

    qwen_vl = build_tiny_checkpoint(tmp_path / "qwen-vl")
    with pytest.raises(ToolError, match=r"official checkpoint's modeling_qwen\.py, which .* lacks"):
        choose_backend(PoolModel(path=str(qwen_vl), backend="vllm"), "auto")
    assert choose_backend(PoolModel(path=str(qwen_vl)), "auto") == "transformers"


def test_a_pool_adapter_s_run_renders_its_prompts_with_its_chat_template_kwargs(standin_vllm, tmp_path):
    """An adapter trained with `model.chat_template_kwargs` (Qwen3.5 with thinking off) is prompted as its run was,
    on vLLM as with transformers; the base alone keeps the template's defaults."""
    from peft import LoraConfig, get_peft_model

    from silkie.config import load_recipe, save_recipe
    from silkie.dev.tiny_qwen3_5 import build_tiny_qwen3_5
    from silkie.tools.annotate.vllm_backend import VllmResponder
    from silkie.tools.common import load_model

    from .conftest import REPO_ROOT

    base = build_tiny_qwen3_5(tmp_path / "qwen3.5")
    run = tmp_path / "run"
    lora = get_peft_model(load_model(base, None), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(run / "adapter")
    recipe = load_recipe(REPO_ROOT / "dpo_config" / "demo_qwen3_5.yaml",
                         [f"model.path={base}", "model.chat_template_kwargs={enable_thinking: false}"])  # fmt: skip
    save_recipe(recipe, run / "config.yaml")
    tuned = VllmResponder(PoolModel(path=str(base), adapter=str(run / "adapter"), backend="vllm"), tmp_path / "out")
    plain = VllmResponder(PoolModel(path=str(base), backend="vllm"), tmp_path / "out")
    assert tuned.prompt_text("What is this?").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert plain.prompt_text("What is this?").endswith("<|im_start|>assistant\n<think>\n")


def test_a_pool_model_s_own_chat_template_kwargs_render_its_prompts(standin_vllm, folder, tmp_path):
    """A pool model's `chat_template_kwargs` (Qwen3.5 with thinking off, no adapter) render its prompts on vLLM and
    with transformers alike; bad ones are refused in pool.yaml, and any on Qwen-VL-Chat when the model loads."""
    from silkie.config.annotate import PoolConfig, RoundsConfig, load_judge, load_pool
    from silkie.dev.tiny_qwen3_5 import build_tiny_qwen3_5
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint
    from silkie.tools.annotate.rounds import policy_models
    from silkie.tools.annotate.sample import Responder, check_pool_folders
    from silkie.tools.annotate.vllm_backend import VllmResponder

    base = build_tiny_qwen3_5(tmp_path / "qwen3.5")
    off = {"enable_thinking": False}
    engine = VllmResponder(PoolModel(path=str(base), backend="vllm", chat_template_kwargs=off), tmp_path / "out")
    assert engine.prompt_text("What is this?").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    image = folder / "picture.png"
    Image.new("RGB", (56, 56), (200, 30, 30)).save(image)
    tokenizer, ids, _ = Responder(PoolModel(path=str(base), chat_template_kwargs=off), device="cpu").inputs(image, "Q")
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    _, default_ids, _ = Responder(PoolModel(path=str(base)), device="cpu").inputs(image, "Q")
    assert tokenizer.decode(default_ids[0]).endswith("<|im_start|>assistant\n<think>\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text(f"models:\n  - {{path: {base}, chat_template_kwargs: {{enable_thinking: no}}}}\n")
    with pytest.raises(RecipeError, match=r"pool.models\[0\].chat_template_kwargs.enable_thinking = 'no'.*true or"):
        load_pool(pool)
    qwen_vl = build_tiny_checkpoint(tmp_path / "qwen-vl")
    refused = r"pool model qwen-vl: chat_template_kwargs = .*null for a qwen_vl model"
    with pytest.raises(ToolError, match=refused):
        Responder(PoolModel(path=str(qwen_vl), chat_template_kwargs=off), device="cpu")
    mixed = PoolConfig(models=[PoolModel(path=str(base)), PoolModel(path=str(qwen_vl), chat_template_kwargs=off)])
    with pytest.raises(ToolError, match=refused):  # before any model of the pool answers
        check_pool_folders(mixed)
    judge = tmp_path / "judge.yaml"  # a local judge takes them too; an endpoint renders its own prompts
    judge.write_text(f"kind: local\nmodel: {base}\nchat_template_kwargs: {{enable_thinking: false}}\n")
    assert load_judge(judge).chat_template_kwargs == off
    judge.write_text("kind: openai\nmodel: gpt-4o\nchat_template_kwargs: {enable_thinking: false}\n")
    with pytest.raises(RecipeError, match=r"judge.chat_template_kwargs = .*null unless judge.kind is local"):
        load_judge(judge)
    from silkie.tools.annotate.serve import parse_args  # `annotate serve --chat-template-kwargs`

    served = parse_args(["--model", "m", "--chat-template-kwargs", "{enable_thinking: false}"])
    assert served.chat_template_kwargs == off
    with pytest.raises(SystemExit):  # argparse's one-line error: `no` is a string, not a switch
        parse_args(["--model", "m", "--chat-template-kwargs", "{enable_thinking: no}"])
    # `annotate rounds` prompts the policy as the recipe renders the pairs it trains on
    policies = policy_models(RoundsConfig(policy_answers=2), base, 1, off)
    assert [model.chat_template_kwargs for model in policies] == [off, off]
