"""The `llmx` command in fresh processes: info, tokenize, errors, lazy start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MODELS_DIR, needs_reference, run_llmx, with_chat_template

import llmx


def test_info_json_on_default_model(gemma_path):
    result = run_llmx("info", str(gemma_path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == 268_098_176
    assert info["tensor_count"] == 236
    counts = {name: entry["count"] for name, entry in info["tensor_types"].items()}
    assert counts == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    assert info["memory"]["kv_bytes_per_token"]["F16"] == 18_432
    assert info["architecture"] == "gemma3" and info["file_type"] == "Q4_K_M"
    assert (info["layers"], info["heads"], info["kv_heads"], info["head_dim"]) == (18, 4, 1, 256)
    assert info["sliding_window"] == 512 and info["vocab_size"] == 262_144
    assert info["chat_template"] == "built-in (gemma)"


def test_info_kv_estimate_caps_sliding_layers(gemma_path):
    info = json.loads(run_llmx("info", str(gemma_path), "--json", "--ctx", "4096", "--parallel", "2").stdout)
    # 15 sliding layers keep 512 positions, 3 global layers keep 4096; 1 KV head of 256 for K and V.
    per_layer_token_f16 = 2 * 1 * 256 * 2
    expected = 2 * (15 * 512 + 3 * 4096) * per_layer_token_f16
    assert info["memory"]["kv_bytes"]["F16"] == expected
    assert info["memory"]["kv_bytes"]["Q8_0"] == expected * 34 // 32 // 2


def test_info_cost_estimate(gemma_path):
    result = run_llmx("info", str(gemma_path), "--json", "--requests-per-month", "1000000",
                      "--tokens-per-request", "500", "--gpu-seconds-per-token", "0.002",
                      "--dollars-per-hour", "2.5")
    cost = json.loads(result.stdout)["cost"]
    assert cost["gpu_hours_per_month"] == pytest.approx(1e6 * 500 * 0.002 / 3600)
    assert cost["dollars_per_month"] == pytest.approx(1e6 * 500 * 0.002 / 3600 * 2.5)
    partial = run_llmx("info", str(gemma_path), "--requests-per-month", "5")
    assert partial.returncode == 2 and b"needs all four" in partial.stderr


def test_info_table_and_tensors(gemma_path):
    result = run_llmx("info", str(gemma_path), "--tensors")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    for text in ("gemma3", "268,098,176", "Q4_K_M", "18,432", "built-in (gemma)", "blk.17.ffn_down.weight"):
        assert text in out


def test_info_default_model_from_the_extra(tmp_path):
    result = run_llmx("info", "--json", env={"LLMX_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert b"first run only" in result.stderr
    assert json.loads(result.stdout)["parameters"] == 268_098_176
    again = run_llmx("info", "--json", env={"LLMX_CACHE_DIR": str(tmp_path)})
    assert again.returncode == 0 and b"first run only" not in again.stderr
    assert not list((tmp_path / "models").glob("*.partial-*"))


def test_tokenize_cli_matches_llama_cpp(gemma_path, reference):
    text = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    expected = reference["gemma"]["tokenize"][text]
    plain = run_llmx("tokenize", str(gemma_path), text, "--json")
    assert json.loads(plain.stdout) == expected["plain"]
    special = run_llmx("tokenize", str(gemma_path), "-", "--json", "--special", stdin=text.encode())
    assert json.loads(special.stdout) == expected["special"]
    no_bos = run_llmx("tokenize", str(gemma_path), "Hello world", "--no-bos")
    assert no_bos.stdout.decode().strip() == str(reference["gemma"]["tokenize"]["Hello world"]["plain"][1:])


def test_tokenize_pieces(gemma_path):
    out = run_llmx("tokenize", str(gemma_path), "Hello world", "--pieces").stdout.decode().splitlines()
    assert out == ["      2 -> '<bos>'", "   9259 -> 'Hello'", "   1902 -> ' world'"]


def test_tokenize_rejects_non_utf8_stdin(gemma_path):
    result = run_llmx("tokenize", str(gemma_path), "-", stdin=b"\xff\xfe bad")
    assert result.returncode == 1
    assert b"not UTF-8" in result.stderr and b"Traceback" not in result.stderr


# -- bad input: one line, exit 1, no traceback, quickly ------------------------


def bad_files(tmp: Path) -> dict[str, Path]:
    import gguf

    source = (MODELS_DIR / "tiny-llama-q8_0.gguf").read_bytes()
    reader = gguf.GGUFReader(MODELS_DIR / "tiny-llama-q8_0.gguf")
    field = reader.tensors[2].field
    offset_pos = field.offset + sum(p.nbytes for p in field.parts[:5])
    type_pos = field.offset + sum(p.nbytes for p in field.parts[:4])
    files = {
        "empty": b"",
        "random": bytes(range(256)) * 40,
        "magic": b"GGML" + source[4:],
        "truncated": source[: len(source) // 2],
        "offset": source[:offset_pos] + (1 << 40).to_bytes(8, "little") + source[offset_pos + 8 :],
        "type": source[:type_pos] + (77).to_bytes(4, "little") + source[type_pos + 4 :],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp / f"{name}.gguf"
        paths[name].write_bytes(data)
    paths["directory"] = tmp / "a-directory"
    paths["directory"].mkdir()
    paths["missing"] = tmp / "missing.gguf"
    return paths


@needs_reference
@pytest.mark.parametrize("case", ["empty", "random", "magic", "truncated", "offset", "type",
                                  "directory", "missing"])
@pytest.mark.parametrize("command", ["info", "tokenize"])
def test_bad_model_files(tmp_path, case, command):
    path = bad_files(tmp_path)[case]
    args = ["info", str(path)] if command == "info" else ["tokenize", str(path), "hi"]
    start = time.perf_counter()
    result = run_llmx(*args)
    elapsed = time.perf_counter() - start
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and result.stdout == b""
    assert elapsed < 2.0


@needs_reference
def test_debug_shows_traceback(tmp_path):
    result = run_llmx("--debug", "info", str(bad_files(tmp_path)["magic"]))
    assert result.returncode == 1 and b"Traceback" in result.stderr and b"GGUFError" in result.stderr


def test_usage_errors_exit_2():
    assert run_llmx("no-such-command").returncode == 2
    assert run_llmx("info", "--ctx", "0").returncode == 2
    assert run_llmx("tokenize", "a", "b", "c").returncode == 2
    too_many = run_llmx("run", str(MODELS_DIR / "tiny-llama-q8_0.gguf"), "hi", "-t", "9999")
    assert too_many.returncode == 2 and b"9999 threads" in too_many.stderr and b"Traceback" not in too_many.stderr


def test_device_names_without_a_gpu():
    """No GPU (none visible, no simulator): `-d cuda` is one line saying so (exit 2), `-d auto`
    runs on the CPU, an unknown device is a usage error."""
    no_gpu = {"NUMBA_ENABLE_CUDASIM": "0", "CUDA_VISIBLE_DEVICES": ""}
    model = str(MODELS_DIR / "tiny-llama-q8_0.gguf")
    cuda = run_llmx("run", model, "hi", "-n", "1", "-d", "cuda", env=no_gpu)
    lines = cuda.stderr.decode().strip().splitlines()
    assert cuda.returncode == 2 and len(lines) == 1 and "--device cuda" in lines[0], cuda.stderr
    auto = run_llmx("run", model, "hi", "-n", "2", "--temp", "0", "-d", "auto", "--no-server", env=no_gpu)
    on_cpu = run_llmx("run", model, "hi", "-n", "2", "--temp", "0", "--no-server")
    assert auto.returncode == 0 and auto.stdout == on_cpu.stdout and auto.stdout
    bogus = run_llmx("bench", model, "-d", "tpu", "-p", "1", "-n", "0")
    assert bogus.returncode == 2 and b"'tpu' is not one of cpu, cuda, auto" in bogus.stderr


def test_version_and_help_import_nothing_heavy():
    assert run_llmx("--version").stdout.decode().strip() == f"llmx {llmx.__version__}"
    probe = (
        "import sys\n"
        "from llmx.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('numba', 'numpy', 'gguf', 'llmx.engine', 'sentencepiece', 'tokenizers',"
        " 'jinja2') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


# -- chat templates: base models say so; a hostile template is one error line --------------------

TINY_LLAMA = MODELS_DIR / "tiny-llama-q8_0.gguf"
NO_TEMPLATE_NOTICE = "has no chat template of its own"


@needs_reference
def test_chat_with_a_model_that_has_no_template_says_which_built_in_it_uses(tmp_path):
    result = run_llmx("run", str(TINY_LLAMA), "hi", "--chat", "-n", "2", "--no-server")
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stderr.decode().splitlines() if NO_TEMPLATE_NOTICE in line]
    assert len(notices) == 1 and "built-in (chatml)" in notices[0], result.stderr
    chat = run_llmx("chat", str(TINY_LLAMA), "-n", "2", "--no-server", stdin=b"hi\n")
    assert chat.returncode == 0 and NO_TEMPLATE_NOTICE in chat.stderr.decode(), chat.stderr
    with_template = with_chat_template(TINY_LLAMA, "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                       tmp_path / "templated.gguf")
    result = run_llmx("run", str(with_template), "hi", "--chat", "-n", "2", "--no-server")
    assert result.returncode == 0 and NO_TEMPLATE_NOTICE not in result.stderr.decode(), result.stderr
    plain = run_llmx("run", str(TINY_LLAMA), "hi", "-n", "2", "--no-server")
    assert NO_TEMPLATE_NOTICE not in plain.stderr.decode()


@needs_reference
@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi",
    "{{ 'x' * 1000000000 }}",
])
def test_a_hostile_template_in_the_file_is_one_error_line(tmp_path, template):
    path = with_chat_template(TINY_LLAMA, template, tmp_path / "hostile.gguf")
    start = time.perf_counter()
    result = run_llmx("run", str(path), "hi", "--chat", "-n", "2", "--no-server", timeout=60)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "chat template (file)" in stderr and "Traceback" not in stderr
    assert time.perf_counter() - start < 30


@needs_reference
def test_a_cold_first_run_compiles_on_two_processes_and_leaves_a_warm_cache(tmp_path):
    """`precompile`: the matmul kernels compile in a helper while this process compiles the rest;
    the text is the warm run's, and the helper's marker then says the cache is warm."""
    model = str(MODELS_DIR / "tiny-llama-q4_k_m.gguf")
    args = ("run", model, "hello there my", "-n", "4", "--temp", "0", "--no-server")
    warm = run_llmx(*args)
    cold_env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"LLMX_CACHE_DIR": str(tmp_path)}
    cold = subprocess.run([sys.executable, "-m", "llmx.cli.main", *args], capture_output=True, env=cold_env,
                          timeout=600)
    assert cold.returncode == 0 and warm.returncode == 0, (cold.stderr, warm.stderr)
    assert cold.stdout == warm.stdout, (cold.stdout, warm.stdout)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "numba").glob("warm-*")) and time.monotonic() < deadline:
        time.sleep(0.5)  # the helper outlives a run that ends first
    assert len(list((tmp_path / "numba").glob("warm-*"))) == 1, list((tmp_path / "numba").iterdir())
    again = subprocess.run([sys.executable, "-m", "llmx.cli.main", *args], capture_output=True, env=cold_env,
                           timeout=600)
    assert again.stdout == warm.stdout, (again.stdout, again.stderr)
