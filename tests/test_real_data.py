"""Real data through every stage, on local files in the hub datasets' formats (nothing downloads):
FineWeb-Edu's web text with the mini-web mixed in, SmolTalk's conversations with the mini-web's,
GSM8K's problems. The `real` preset points the same fields at the hub (labkit/presets.py, REAL_DATA)."""

import json
import random

import pytest

from labkit.config import STAGES, ConfigError, check_config, get_config
from labkit.data import load_documents, read_corpus, read_world
from labkit.pipeline import ensure
from labkit.presets import PRESETS, REAL_DATA
from labkit.run import Run, load_run, read_jsonl
from labkit.search import SearchIndex

TOPICS = ["rivers", "volcanoes", "bees", "bridges", "clouds", "forests", "glaciers", "comets", "tides", "deserts"]
NOUNS = ["students", "farmers", "engineers", "children", "teachers", "sailors", "doctors", "artists", "miners"]
ADJECTIVES = ["large", "quiet", "ancient", "bright", "narrow", "famous", "strange", "gentle", "rapid", "cold"]
SENTENCES = [
    "Many {noun} learn about {topic} when they are {n} years old.",
    "The {adj} {topic} of the north were first described in {year}.",
    "A good way to study {topic} is to watch them for {n} days and write down what changes.",
    "In {year}, a group of {noun} measured {topic} near a {adj} town.",
    "Some {noun} believe that {topic} can teach us about patience and time.",
    "Scientists have counted {n} kinds of {topic} in the {adj} valleys of the south.",
    "When the weather turns {adj}, {topic} behave in ways that surprise most {noun}.",
    "Books written for {noun} often explain {topic} with simple drawings and short words.",
    "The museum keeps {n} old maps that show {adj} {topic} from before {year}.",
    "It takes about {n} hours to walk along the {adj} path that the {noun} built.",
    "Our school library has a {adj} book about {topic} that {noun} like to borrow.",
    "Every spring, {noun} travel {n} miles to see the {topic} at their best.",
]


def sentence(template: str, topic: str, rng: random.Random) -> str:
    return template.format(
        topic=topic,
        noun=rng.choice(NOUNS),
        adj=rng.choice(ADJECTIVES),
        n=rng.randint(2, 900),
        year=rng.randint(1700, 2020),
    )


def fineweb_edu_rows(n: int, seed: int = 0) -> list[dict]:
    """Short English documents in FineWeb-Edu's columns (text, id, dump, url, ... , int_score)."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        topic = rng.choice(TOPICS)
        body = [sentence(t, topic, rng) for t in rng.sample(SENTENCES, 8)]
        text = (
            f"What {rng.choice(NOUNS)} should know about {topic}\n" + " ".join(body[:4]) + "\n\n" + " ".join(body[4:])
        )
        rows.append(
            dict(
                text=text,
                id=f"<urn:uuid:{i:08d}>",
                dump="CC-MAIN-2024-10",
                url=f"https://edu-{i % 37}.example.org/{topic}/{i}",
                file_path="s3://commoncrawl/crawl-data/x.warc.gz",
                language="en",
                language_score=0.97,
                token_count=len(text) // 4,
                score=3.1,
                int_score=3,
            )
        )
    return rows


def smoltalk_rows(n: int) -> list[dict]:
    """Conversations in SmolTalk's format: `messages`, a list of {role, content}, and `source`."""
    rows = []
    for i in range(n):
        topic, noun = TOPICS[i % len(TOPICS)], NOUNS[i % len(NOUNS)]
        messages = [
            {"role": "user", "content": f"Can you tell me one thing about {topic}?"},
            {"role": "assistant", "content": f"Many {noun} study {topic}; they change with the seasons."},
        ]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": "Thanks! Any other fact?"},
                {"role": "assistant", "content": f"Some {topic} are older than {i + 2} hundred years."},
            ]
        rows.append(dict(messages=messages, source="smol-magpie-ultra-short"))
    return rows


def gsm8k_rows(n: int) -> list[dict]:
    """Problems in GSM8K's format: `question`, `answer` with calculator notes and '#### N' at the end."""
    rows = []
    for i in range(n):
        a, b = 3 + i % 7, 2 + i % 5
        rows.append(
            dict(
                question=f"Sam has {a} apples and buys {b} more. How many apples does Sam have?",
                answer=f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            )
        )
    return rows


def write(path, rows: list[dict]):
    """A .jsonl or .parquet file of `rows`, as the hub's files are."""
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub-formats")
    web = fineweb_edu_rows(400)
    web[5] = dict(web[5], text=web[5]["text"] + " Write to jo.smith@mailbox.org for the full notes.")
    web[7] = dict(web[3], url="https://mirror.example.net/copy")  # an exact copy, under another URL
    return dict(
        fineweb=write(folder / "fineweb-edu.parquet", web),
        smoltalk=write(folder / "smoltalk.jsonl", smoltalk_rows(40)),
        gsm8k=write(folder / "gsm8k.jsonl", gsm8k_rows(30)),
        urls={row["url"] for row in web},
    )


def test_the_corpus_holds_the_stated_share_of_mini_web_characters(local_files, tmp_path):
    """The share is of the cleaned corpus's characters; the cleaning steps run over the dataset's
    documents too (its copy removed, its e-mail redacted) and are scored on the mini-web's labels only."""
    alone = ensure("data", get_config("tiny"), Run("alone", tmp_path))
    for share in (0.3, 0.6):
        config = get_config("tiny", data=dict(source=local_files["fineweb"], mini_web_share=share))
        run = Run(f"mixed-{share}", tmp_path)
        metrics = ensure("data", config, run)
        corpus = read_corpus(run)
        dataset = sum(len(p["text"]) for p in corpus if p["url"] in local_files["urls"])
        measured = 1 - dataset / sum(len(p["text"]) for p in corpus)
        assert abs(measured - share) < 0.01
        assert metrics["mix"]["mini_web_share_measured"] == pytest.approx(measured, abs=1e-4)
        assert read_world(run) is not None and metrics["mix"]["dataset_docs_read"] < 400  # read only what it needs
        assert metrics["precision"] == alone["precision"] and metrics["recall"] == alone["recall"]
        texts = {p["url"]: p["text"] for p in corpus}
        assert "https://mirror.example.net/copy" not in texts  # the dataset's exact copy, removed
        redacted = [t for url, t in texts.items() if url.startswith("https://edu-5.example.org/") and "full notes" in t]
        assert redacted and "<EMAIL>" in redacted[0] and "jo.smith" not in redacted[0]
        print(share, metrics["mix"], metrics["removed"])


def test_real_data_through_all_seven_stages(local_files, tmp_path, one_thread):
    """The command line on the tiny preset, the data fields set as README's "Real data" says, on local
    files: every stage runs, and the stages that judge by the world still have it."""
    from labkit.cli import main

    settings = [
        f"data.source={local_files['fineweb']}",
        "data.mini_web_share=0.3",
        f"sft.source={local_files['smoltalk']}",
        "sft.mini_web_share=0.5",
        "sft.n_conversations=30",  # the 40 SmolTalk rows fill the other half
        f"grpo.source={local_files['gsm8k']}",
    ]
    args = ["run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--run", "real"]
    assert main(args + [a for s in settings for a in ("--set", s)]) == 0
    run = load_run("real", tmp_path)
    assert run.stages == list(STAGES)
    m = run.metrics
    assert abs(m["data"]["mix"]["mini_web_share_measured"] - 0.3) < 0.01 and m["data"]["precision"]["url"] == 1.0
    share = f"Mini-web share of the cleaned corpus's characters: **{m['data']['mix']['mini_web_share_measured']}**"
    assert share in (tmp_path / "real" / "report.md").read_text()
    assert m["tokenizer"]["vocab_size"] == 300
    assert set(m["base"]["fact_recall"]) == {"0", "1", "2-4", "5-16", "17+"}  # probed on the planted world

    train = read_jsonl(run.path("sft") / "train.jsonl")
    assert sum(r["kind"] == "dataset" for r in train) == 30 and m["sft"]["mini_web_share"] == 0.5
    assert {"qa", "identity", "refusal"} <= {r["kind"] for r in train}
    # SFT's QA is judged against the world: every fact of the held-out people (5 people x 5 facts on tiny)
    assert m["sft"]["n_qa_heldout"] == 25 and m["sft"]["qa_accuracy_all"] is not None
    assert m["sft"]["source"] == local_files["smoltalk"]

    assert m["rlhf"]["n_prompts"] == 32 and m["rlhf"]["ppo_win_rate"] is not None
    heldout = read_jsonl(run.path("grpo") / "heldout.jsonl")
    assert m["grpo"]["tasks"] == "gsm8k" and len(heldout) == 3 and "apples" in heldout[0]["prompt"]
    assert m["grpo"]["pass_at_1_after"] is not None
    assert m["halluc"]["n_questions"]["all"] == 40 and 0 <= m["halluc"]["hallucination_rate_before"]["all"] <= 1
    assert m["halluc"]["search_accuracy"] is not None
    # and its search tool searches the mixed corpus, the dataset's passages with the mini-web's
    mini_web = [p for p in read_corpus(run.run) if p["url"] not in local_files["urls"]]
    assert m["halluc"]["n_passages"] > len(SearchIndex(mini_web).passages)


# --- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(data=dict(source="HuggingFaceFW/fineweb-edu")),
            "data.source='HuggingFaceFW/fineweb-edu' is read from the Hugging Face hub, and data.max_docs=0 reads "
            "every row",
        ),
        (
            dict(sft=dict(source="HuggingFaceTB/smoltalk")),
            "sft.source='HuggingFaceTB/smoltalk' is read from the Hugging Face hub, and sft.max_conversations=0",
        ),
        (dict(data=dict(source="docs.jsonl", mini_web_share=1.0)), "data.mini_web_share=1.0 is out of range"),
        (dict(sft=dict(mini_web_share=-0.1)), "sft.mini_web_share=-0.1 is out of range"),
    ],
)
def test_bad_real_data_settings_fail_at_once_naming_the_field(overrides, message, monkeypatch):
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    with pytest.raises(ConfigError) as error:
        get_config("tiny", **overrides)
    assert str(error.value).startswith(message)


def test_a_mix_needs_a_world_and_the_command_line_stops_before_any_work(tmp_path, capsys):
    from labkit.cli import main

    no_world = get_config("tiny", data=dict(source="docs.jsonl"), sft=dict(source="chats.jsonl", mini_web_share=0.5))
    assert check_config(no_world, ["data", "tokenizer", "base"]) is no_world
    with pytest.raises(ConfigError, match=r"and sft.mini_web_share>0 writes conversations from the mini-web's world"):
        check_config(no_world, ["sft"])
    args = ["run", "--preset", "tiny", "--runs-dir", str(tmp_path), "--set", "data.source=docs.jsonl"]
    assert main(args + ["--set", "sft.source=chats.jsonl", "--set", "sft.mini_web_share=0.5"]) == 2
    assert "data.mini_web_share > 0 (mixes the mini-web in)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was built


def test_the_real_preset_is_gpu_on_the_hub_datasets(monkeypatch):
    monkeypatch.delenv("LABKIT_PRESET", raising=False)
    config, gpu = get_config("real"), get_config("gpu")
    for section, fields in REAL_DATA.items():
        assert {name: getattr(getattr(config, section), name) for name in fields} == fields
    assert (config.data.source, config.data.config) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert (config.sft.source, config.grpo.source, config.grpo.config) == (
        "HuggingFaceTB/smol-smoltalk",
        "openai/gsm8k",
        "main",
    )
    assert config.model == gpu.model and config.data.n_people == gpu.data.n_people and "real" in PRESETS
    assert check_config(config, list(STAGES)) is config


def fake_hub(monkeypatch, rows: list[dict]) -> list:
    """`datasets.load_dataset` replaced by a stream of `rows` that records its arguments and how many rows
    were read: nothing downloads."""
    import datasets

    calls = []

    def load_dataset(path, name=None, **kwargs):
        call = dict(path=path, name=name, **kwargs, read=0)
        calls.append(call)

        def stream():
            for row in rows:
                call["read"] += 1
                yield row

        return stream()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_hub_name_goes_to_datasets_with_its_config_and_split_and_streams(monkeypatch):
    """Each stage hands `datasets.load_dataset` the source, config and split its settings name, streaming."""
    from labkit.conversations import load_messages
    from labkit.grpo import load_tasks
    from labkit.sft import load_conversations

    def sent(call):
        return call["path"], call["name"], call["split"], call["streaming"]

    calls = fake_hub(monkeypatch, fineweb_edu_rows(50))
    cfg = get_config("tiny", data=dict(source="HuggingFaceFW/fineweb-edu", config="sample-10BT", max_docs=7)).data
    assert len(load_documents(cfg)) == 7
    assert [sent(c) for c in calls] == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert calls[0]["read"] == 8  # the 8th row shows the limit was reached, and nothing after it was read

    calls = fake_hub(monkeypatch, smoltalk_rows(20))
    sft = dict(source="HuggingFaceTB/smoltalk", config="all", split="test", max_conversations=10)
    train, val = load_conversations(get_config("tiny", sft=sft), world=None)
    assert (len(train), len(val)) == (9, 1) and sent(calls[0]) == ("HuggingFaceTB/smoltalk", "all", "test", True)

    calls = fake_hub(monkeypatch, gsm8k_rows(10))
    _, heldout = load_tasks(get_config("tiny", grpo=dict(source="openai/gsm8k", split="test")), world=None)
    assert len(heldout) == 3 and sent(calls[0]) == ("openai/gsm8k", "main", "test", True)

    calls = fake_hub(monkeypatch, smoltalk_rows(3))
    load_messages("some/chats")
    assert calls[0]["name"] is None  # config '' is the dataset's default


def test_a_mixed_corpus_reads_only_the_documents_its_share_needs(monkeypatch, tmp_path):
    """A hub source in a mix is streamed until the dataset's characters fill 1 - share."""
    calls = fake_hub(monkeypatch, fineweb_edu_rows(2000))
    config = get_config("tiny", data=dict(source="HuggingFaceFW/fineweb-edu", max_docs=100_000, mini_web_share=0.5))
    metrics = ensure("data", config, Run("hub-mix", tmp_path))
    assert calls[0]["read"] == metrics["mix"]["dataset_docs_read"] + 1 < 200
    assert abs(metrics["mix"]["mini_web_share_measured"] - 0.5) < 0.01


def test_a_dataset_too_short_for_the_share_says_so(local_files, tmp_path, capsys):
    """400 documents cannot be 90% of a corpus whose mini-web is 75k characters: all are read, the
    share measured is the mini-web's real one, and a line says so."""
    config = get_config("tiny", data=dict(source=local_files["fineweb"], mini_web_share=0.1))
    metrics = ensure("data", config, Run("short", tmp_path))
    assert metrics["mix"]["dataset_docs_read"] == 400 and metrics["mix"]["mini_web_share_measured"] > 0.2
    assert "characters of the" in capsys.readouterr().err
