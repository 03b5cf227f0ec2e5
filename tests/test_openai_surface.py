"""The OpenAI surface vLLM users expect (issue 24): logit_bias, echo, stream_options.include_usage, vLLM's
extension fields, /tokenize, /detokenize, /version, --api-key, --served-model-name and --chat-template, each
against one real `inferneo serve` subprocess, through the official openai client (extra_body for vLLM's fields)
and httpx."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

import inferneo_runtime  # noqa: E402
from conftest import free_port, serve_subprocess  # noqa: E402
from inferneo_runtime.tokenizer import Tokenizer  # noqa: E402

KEY = "sk-test-key"
ADMIN = "admin-token"
NAME = "my-model"  # --served-model-name
APP_ORIGIN = "https://app.example"  # --allowed-origins
PROMPT = "The quick brown fox"
# --chat-template: a template of its own, with a variable a request sets through chat_template_kwargs
TEMPLATE = ("{% if enable_thinking %}THINK {% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "user", "content": "Hello world, this is a tiny tokenizer."}]


@pytest.fixture(scope="module")
def llama(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def tok(llama):
    return Tokenizer(llama)


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("openai-surface")
    (cwd / "template.jinja").write_text(TEMPLATE)
    port = free_port()
    args = [str(llama), "--port", str(port), "--log-level", "warning", "--api-key", KEY, "--served-model-name", NAME,
            "--chat-template", str(cwd / "template.jinja"), "--allowed-origins", APP_ORIGIN]
    with serve_subprocess(args, cwd, port, env={"INFERNEO_ADMIN_TOKEN": ADMIN}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, json: dict, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=json, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def greedy(client, prompt: str = PROMPT, n_tokens: int = 12, **extra):
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=n_tokens, temperature=0,
                                     extra_body={"ignore_eos": True, **extra})


# -- logit_bias ---------------------------------------------------------------------------------------------
def test_logit_bias_steers_greedy_decoding(client, tok, llama):
    forced = tok.encode(" fox", add_special_tokens=False)[0]
    out = greedy(client, logit_bias={str(forced): 100})
    assert out.choices[0].text == tok.decode([forced] * 12)  # +100: that token every step
    with inferneo_runtime.load(llama) as local:  # the greedy token ids, which the text alone may not tell
        plain = local.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
        first = plain.token_ids[0]
        banned = local.generate(PROMPT, max_new_tokens=4, ignore_eos=True, logit_bias={first: -100})
    assert banned.token_ids[0] != first  # -100 on the greedy token: another one is chosen
    assert greedy(client, n_tokens=4).choices[0].text == plain.text
    assert greedy(client, n_tokens=4, logit_bias={str(first): -100}).choices[0].text == banned.text
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == tok.decode([forced] * 5)


@pytest.mark.parametrize("bias", [{"abc": 1}, {"5": 101}, {"-3": 1}, {"99999": 1}])
def test_bad_logit_bias_is_a_400_naming_it(client, bias):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, logit_bias=bias)
    assert e.value.body["param"] == "logit_bias", e.value.body


# -- echo, include_usage, stop strings, special tokens ---------------------------------------------------------
def test_echo_prepends_the_prompt_streamed_or_not(client, tok):
    plain = greedy(client).choices[0].text
    full = greedy(client, echo=True)
    assert full.choices[0].text == PROMPT + plain
    ids = tok.encode(PROMPT)
    by_ids = greedy(client, prompt=ids, echo=True).choices[0].text
    assert by_ids == tok.decode(ids) + plain
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       echo=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == PROMPT + plain


def _reference_prompt_logprobs(llama, ids: list[int]) -> list[float]:
    """Each prompt token's log-probability given those before it, from one prefill of the artifact's own model."""
    from inferneo_runtime.goldens import prefill_logits
    from inferneo_runtime.sampling import log_softmax

    with inferneo_runtime.load(llama) as local:
        logits = prefill_logits(local.backend, ids)
    return [float(log_softmax(logits[i - 1])[ids[i]]) for i in range(1, len(ids))]


def test_echo_with_logprobs_scores_the_prompt_streamed_or_not(client, tok, llama):
    ids = tok.encode(PROMPT)
    expected = _reference_prompt_logprobs(llama, ids)
    plain = greedy(client, logprobs=2).choices[0]
    full = greedy(client, echo=True, logprobs=2).choices[0]
    lp = full.logprobs
    assert full.text == PROMPT + plain.text and len(lp.tokens) == len(ids) + 12
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert lp.tokens[len(ids):] == plain.logprobs.tokens  # then the generated tokens, as without echo
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       echo=True, logprobs=2, extra_body={"ignore_eos": True})
    chunks = [ch.choices[0] for ch in stream if ch.choices]
    assert "".join(c.text for c in chunks) == full.text
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == lp.text_offset


def test_best_of_returns_the_most_likely_samples(client):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    samples = client.completions.create(n=3, logprobs=0, **kw).choices  # choice i samples with seed 7 + i
    score = {c.text: sum(c.logprobs.token_logprobs) for c in samples}
    assert len(score) > 1  # the samples differ, or the test proves nothing
    best = client.completions.create(n=1, best_of=3, logprobs=0, **kw).choices
    assert [c.text for c in best] == [max(score, key=score.get)]
    two = client.completions.create(n=2, best_of=3, **kw).choices
    assert [c.text for c in two] == sorted(score, key=score.get, reverse=True)[:2] and two[0].logprobs is None
    for bad in ({"n": 2, "best_of": 1}, {"best_of": 2, "stream": True}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**kw, **bad})
        assert e.value.body["param"] == "best_of", bad


def test_prompt_logprobs_as_vllm_returns_them(server, client, tok, llama):
    ids = tok.encode(PROMPT)
    expected = _reference_prompt_logprobs(llama, ids)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    got = post(server, "/v1/completions", body).json()["choices"][0]["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for i, (entry, want) in enumerate(zip(got[1:], expected), start=1):
        token = entry[str(ids[i])]  # the prompt's own token is always there, with its rank
        assert token["logprob"] == pytest.approx(want, abs=1e-4) and token["decoded_token"] == tok.decode([ids[i]])
        ranked = sorted((e["rank"], e["logprob"]) for k, e in entry.items() if e["rank"] <= 3)
        assert [r for r, _ in ranked][:3] == [1, 2, 3] and ranked == sorted(ranked, key=lambda x: -x[1])
        assert (token["rank"] == 1) == (token["logprob"] >= ranked[0][1] - 1e-6)
    chat = post(server, "/v1/chat/completions", {"model": NAME, "messages": MESSAGES, "max_tokens": 2,
                                                 "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])  # 0: the prompt's own token only
    r = post(server, "/v1/completions", {**body, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_include_usage_ends_the_stream_with_the_usage(client):
    full = greedy(client)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(ch.usage is None for ch in chunks[:-1])
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == chat.usage


def test_include_stop_str_in_output(client):
    text = greedy(client, n_tokens=24).choices[0].text
    stop = text[6:9]
    at = text.find(stop)
    cut = greedy(client, n_tokens=24, stop=[stop]).choices[0]
    kept = greedy(client, n_tokens=24, stop=[stop], include_stop_str_in_output=True).choices[0]
    assert cut.text == text[:at] and kept.text == text[:at + len(stop)] and kept.finish_reason == "stop"


def test_skip_special_tokens(client, tok):
    bos = tok.bos_id  # "<s>", a special token that is not a stop token
    forced = {"logit_bias": {str(bos): 100}}
    assert greedy(client, n_tokens=3, **forced).choices[0].text == ""
    assert greedy(client, n_tokens=3, skip_special_tokens=False, **forced).choices[0].text == "<s><s><s>"


# -- chat template: --chat-template, add_generation_prompt, continue_final_message, chat_template_kwargs ---------
def test_chat_template_options(server, client, tok):
    def tokens(**body) -> list[int]:
        r = post(server, "/tokenize", {"model": NAME, "messages": MESSAGES, **body})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    user = f"user: {MESSAGES[0]['content']}\n"
    assert tokens() == tok.encode(user + "assistant:", add_special_tokens=False)  # --chat-template's rendering
    assert tokens(add_generation_prompt=False) == tok.encode(user, add_special_tokens=False)
    assert tokens(chat_template_kwargs={"enable_thinking": True}) == tok.encode(
        "THINK " + user + "assistant:", add_special_tokens=False)
    turns = MESSAGES + [{"role": "assistant", "content": "The quick"}]
    r = post(server, "/tokenize", {"messages": turns, "add_generation_prompt": False, "continue_final_message": True})
    expected = tok.encode(user + "assistant: The quick", add_special_tokens=False)
    assert r.json()["tokens"] == expected
    chat = client.chat.completions.create(model=NAME, messages=turns, max_tokens=2, temperature=0, extra_body={
        "add_generation_prompt": False, "continue_final_message": True})
    assert chat.usage.prompt_tokens == len(expected)
    with pytest.raises(openai.BadRequestError):  # both at once contradict each other
        client.chat.completions.create(model=NAME, messages=turns, max_tokens=2,
                                       extra_body={"continue_final_message": True})


# -- /tokenize, /detokenize, /version --------------------------------------------------------------------------
def test_tokenize_detokenize_round_trip(server, tok):
    text = "Inferneo compiles models ahead of time."
    r = post(server, "/tokenize", {"model": NAME, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 128
    r = post(server, "/detokenize", {"model": NAME, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(body["tokens"])}
    r = post(server, "/detokenize", {"model": NAME, "tokens": [99999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = post(server, "/tokenize", {"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(f"{server.url}/version").json() == {"version": inferneo_runtime.__version__}


# -- --api-key, --served-model-name ----------------------------------------------------------------------------
def test_api_key_guards_inference_and_leaves_probes_open(server, client):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=NAME, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for call in (lambda: wrong.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2),
                 lambda: wrong.models.list()):
        with pytest.raises(openai.AuthenticationError):
            call()
    for path in ("/tokenize", "/detokenize"):
        assert post(server, path, {"prompt": "hi", "tokens": [5]}, key="sk-wrong").status_code == 401
        assert httpx.post(f"{server.url}{path}", json={"prompt": "hi", "tokens": [5]}).status_code == 401
    for path in ("/health", "/ready", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    assert httpx.get(f"{server.url}/v1/models/{NAME}").status_code == 401
    admin = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {ADMIN}"})
    assert admin.status_code == 200  # the admin token, the stronger credential, opens them too
    # the admin token is not weakened: the API key does not open the management endpoints
    r = httpx.post(f"{server.url}/v1/models/{NAME}/load", json={}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 403
    assert greedy(client, n_tokens=2).usage.completion_tokens == 2  # and the server goes on serving


def test_cors_answers_the_allowed_origin_only(server):
    preflight = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)  # a browser's preflight: no key
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}", "Origin": APP_ORIGIN}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    # the key is still required from an allowed origin, and another origin is given no CORS grant
    r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2},
                   headers={"Origin": APP_ORIGIN}, timeout=60)
    assert r.status_code == 401
    r = httpx.options(f"{server.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_served_model_name_replaces_the_models_name(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert greedy(client, n_tokens=2).model == NAME
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2)


def test_settings_from_the_environment_and_their_errors(tmp_path, llama):
    from inferneo_runtime.server.config import ConfigError, artifacts_to_serve, load_server_config, read_chat_template

    assert load_server_config(env={"INFERNEO_API_KEY": "k"}).api_key == "k"
    two = load_server_config(overrides={"models": [str(llama), str(llama)], "served_model_name": "x"}, env={})
    with pytest.raises(ConfigError, match="served-model-name"):
        artifacts_to_serve(two)
    with pytest.raises(ConfigError, match="allow_credentials with allowed_origins"):
        load_server_config(env={"INFERNEO_ALLOWED_ORIGINS": "*", "INFERNEO_ALLOW_CREDENTIALS": "1"})
    assert load_server_config(env={"INFERNEO_ALLOWED_ORIGINS": "https://a.example,https://b.example"}
                              ).allowed_origins == ["https://a.example", "https://b.example"]
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="chat-template"):
        read_chat_template(load_server_config(overrides={"chat_template": str(tmp_path / "bad.jinja")}, env={}))


# -- every bad parameter is a 400 naming it (`param`), as OpenAI's errors do ------------------------------------
@pytest.mark.parametrize("endpoint,kwargs,param", [
    ("completions", dict(prompt=PROMPT, stream_options={"include_usage": True}), "stream_options"),
    ("chat", dict(messages=MESSAGES, stream_options={"include_usage": True}), "stream_options"),
    ("chat", dict(messages=MESSAGES, top_logprobs=2), "top_logprobs"),
    ("completions", dict(prompt=PROMPT, stop=""), "stop"),
    ("chat", dict(messages=MESSAGES, stop=["ok", ""]), "stop"),
    ("completions", dict(prompt=""), "prompt"),
    ("completions", dict(prompt=[]), "prompt"),
    ("completions", dict(prompt=[[]]), "prompt"),
    ("chat", dict(messages=[{"role": "user", "content": [{"type": "image_url",
                                                          "image_url": {"url": "https://a.example/x.png"}}]}]),
     "messages"),
])
def test_bad_params_are_400s_naming_the_param(client, endpoint, kwargs, param):
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    with pytest.raises(openai.BadRequestError) as e:
        create(model=NAME, max_tokens=2, **kwargs)
    assert e.value.body["param"] == param, e.value.body
    assert greedy(client, n_tokens=2).usage.completion_tokens == 2  # and the server goes on serving


def test_chat_logprobs_bytes_join_into_the_text(client):
    """OpenAI's `bytes`: each token's own UTF-8 bytes, which join into the text even where a character spans
    several tokens (a byte-level token's text alone is then U+FFFD). Streamed or not."""
    text = "é€ 日本"  # several byte tokens per character in the tiny byte-level BPE
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=30, logprobs=True, top_logprobs=2,
              extra_body={"guided_choice": [text]})
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.message.content == text and choice.finish_reason == "stop"
    tokens = choice.logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode("utf-8") == text, [(t.token, t.bytes) for t in tokens]
    assert all(t.bytes == top.bytes for t in tokens for top in t.top_logprobs if top.token == t.token
               and top.logprob == t.logprob)
    streamed = [t for ch in client.chat.completions.create(stream=True, **kw) if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert [t.bytes for t in streamed] == [t.bytes for t in tokens]
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, logprobs=True,
                                           extra_body={"guided_choice": [" the fox"]}).choices[0]
    assert [bytes(t.bytes).decode() for t in plain.logprobs.content] == [t.token for t in plain.logprobs.content]


@pytest.mark.parametrize("kind", ["byte-level BPE in a decoder Sequence", "SentencePiece byte fallback"])
def test_token_bytes_join_into_the_text_for_either_byte_scheme(tmp_path, llama, kind):
    """The two ways a token holds part of a character: byte-level BPE (here inside a decoder Sequence, as a GGUF
    conversion writes it) and SentencePiece's `<0xNN>` byte fallback. Either way the tokens' bytes join."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    text = "é€ 日本 ok"
    if kind.startswith("byte-level"):
        hf = HFTokenizer.from_file(str(llama / "tokenizer.json"))
        hf.decoder = decoders.Sequence([decoders.ByteLevel()])
    else:
        vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(" ok")}}
        vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token holds part of a character
    assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == text


# -- settings must be finite ---------------------------------------------------------------------------------
@pytest.mark.parametrize("setting,value", [("prefix_cache_mb", "inf"), ("memory_budget_gb", "inf"),
                                           ("graceful_timeout_s", "1e999")])
def test_infinite_settings_are_refused_naming_the_setting(tmp_path, llama, setting, value):
    """inf passes a `ge=0` bound; it must be refused as the setting's error, from a flag, the environment or the
    config file, not fail later (int(inf) when the prefix cache is sized, a time_t overflow at shutdown)."""
    from conftest import run_cli
    from inferneo_runtime.server.config import ConfigError, load_server_config

    with pytest.raises(ConfigError, match=f"INFERNEO_{setting.upper()}.*{setting}: .*finite"):
        load_server_config(env={f"INFERNEO_{setting.upper()}": value})
    (tmp_path / "serve.yaml").write_text(f"{setting}: .inf\n")
    with pytest.raises(ConfigError, match=f"serve.yaml: {setting}: .*finite"):
        load_server_config(tmp_path / "serve.yaml", env={})
    flag = "--drain-timeout" if setting == "graceful_timeout_s" else "--" + setting.replace("_", "-")
    r = run_cli("serve", str(llama), "--port", str(free_port()), flag, value, timeout=120)
    assert r.returncode == 2 and f"command line: {setting}: " in r.stderr and "finite" in r.stderr, r.stderr
