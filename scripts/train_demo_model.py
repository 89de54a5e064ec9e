"""Train Pomona's built-in demo model and write it to ``pomona/demo/``.

Fixed seeds drive the corpus, the tokenizer and the training run. The steps are:

1. write a corpus of simple English (stories and facts about a lab of computers, fruit,
   animals and weather) from the templates below; it is all our own generated text;
2. train a byte-level BPE tokenizer on it with ``tokenizers``;
3. train a small llama model (``mlx_lm.models.llama``) with MLX on its default device;
4. save float16 weights, ``config.json`` and the tokenizer files in mlx-lm layout.

After retraining, paste the printed SHA-256 into ``DEMO_WEIGHTS_SHA256`` in
``pomona/demo_model.py``.

The shipped weights come from the defaults below (2,000 steps, 8.2M tokens), run on
MLX's CUDA backend in about a minute (an Apple Silicon GPU should take minutes; not
measured). The corpus and tokenizer are the same on every machine; GPU training does not
repeat bit for bit (two runs ended at held-out loss 0.247 and 0.250). On a two-core CPU
the full run takes hours; ``--steps 200`` gives a rough model (English with mixed-up
facts) in 30-60 minutes, for trying changes. On Linux, ``mlx[cpu]`` links the
reference BLAS; preloading OpenBLAS makes CPU training ~15x faster::

    apt-get install libopenblas0-pthread
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 \\
        python scripts/train_demo_model.py --steps 200 --out /tmp/demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger("train_demo_model")

SEED = 1234
OUT_DIR = Path(__file__).resolve().parent.parent / "pomona" / "demo"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# Rendered by mlx-lm's apply_chat_template; dialogue documents use the same layout.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}"
    "Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class TrainConfig:
    corpus_bytes: int = 3_000_000
    vocab_size: int = 1024
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    warmup_steps: int = 100
    learning_rate: float = 3e-3
    weight_decay: float = 0.01


# --- corpus --------------------------------------------------------------------------

PEOPLE = [
    ("Ana", "she"), ("Ben", "he"), ("Mia", "she"), ("Tom", "he"), ("Lily", "she"),
    ("Sam", "he"), ("Nora", "she"), ("Leo", "he"), ("Emma", "she"), ("Max", "he"),
    ("Zoe", "she"), ("Finn", "he"), ("Ruby", "she"), ("Omar", "he"), ("Ella", "she"),
    ("Jack", "he"), ("Ivy", "she"), ("Noah", "he"), ("Rosa", "she"), ("Hugo", "he"),
]  # fmt: skip
POSSESSIVE = {"she": "her", "he": "his"}
NUMBERS = ["two", "three", "four", "five", "six"]
COMPUTERS = ["Maple", "Cedar", "Birch", "Oak", "Pine", "Willow", "Elm", "Ash"]
# name, plural, color, taste, where it grows
FRUITS = [
    ("apple", "apples", "red", "sweet and crisp", "on trees"),
    ("banana", "bananas", "yellow", "soft and sweet", "in warm places"),
    ("orange", "oranges", "orange", "sweet and juicy", "on trees"),
    ("lemon", "lemons", "yellow", "very sour", "on small trees"),
    ("grape", "grapes", "green", "small and sweet", "on vines"),
    ("pear", "pears", "green", "soft and sweet", "on trees"),
    ("plum", "plums", "purple", "sweet and juicy", "on trees"),
    ("cherry", "cherries", "red", "small and sweet", "on trees"),
    ("peach", "peaches", "pink", "soft and juicy", "on trees"),
    ("strawberry", "strawberries", "red", "sweet", "close to the ground"),
    ("watermelon", "watermelons", "green", "big and juicy", "on the ground"),
    ("mango", "mangoes", "yellow", "sweet and soft", "in warm places"),
    ("fig", "figs", "purple", "soft and sweet", "on trees"),
]
# name, plural, sound (present, past), home, food, habit
ANIMALS = [
    ("cat", "cats", "meows", "meowed", "in the house", "eats fish", "likes to sleep in the sun"),
    ("dog", "dogs", "barks", "barked", "in the house", "eats meat", "likes to run and play"),
    ("cow", "cows", "moos", "mooed", "on the farm", "eats grass", "gives milk"),
    ("horse", "horses", "neighs", "neighed", "on the farm", "eats hay", "can run very fast"),
    ("duck", "ducks", "quacks", "quacked", "near the pond", "eats seeds", "likes to swim"),
    ("sheep", "sheep", "says baa", "said baa", "on the farm", "eats grass", "gives us wool"),
    ("bird", "birds", "sings", "sang", "in a nest", "eats seeds", "can fly high"),
    ("owl", "owls", "hoots", "hooted", "in a tall tree", "eats mice", "is awake at night"),
    ("frog", "frogs", "croaks", "croaked", "near the pond", "eats flies", "can jump far"),
    ("rabbit", "rabbits", "is very quiet", "was very quiet", "in a hole", "eats carrots",
     "has long ears"),
    ("bee", "bees", "buzzes", "buzzed", "in a hive", "drinks from flowers", "makes honey"),
    ("hen", "hens", "clucks", "clucked", "on the farm", "eats seeds", "lays eggs"),
    ("mouse", "mice", "squeaks", "squeaked", "in a small hole", "eats cheese", "is very small"),
    ("goat", "goats", "bleats", "bleated", "on the farm", "eats grass", "likes to climb"),
]  # fmt: skip
# kind, the sky (present, past), what people do (present, past), how the air feels
WEATHER = [
    ("sunny", "the sun is bright and the sky is blue", "the sun was bright and the sky was blue",
     "play outside", "played outside", "warm"),
    ("rainy", "rain falls and the streets get wet", "rain fell and the streets were wet",
     "take an umbrella", "took an umbrella", "wet"),
    ("cloudy", "gray clouds cover the sky", "gray clouds covered the sky",
     "wear a jacket", "wore a jacket", "cool"),
    ("windy", "the wind blows the leaves around", "the wind blew the leaves around",
     "hold on to their hats", "held on to their hats", "fresh"),
    ("snowy", "snow covers the ground and the trees", "snow covered the ground and the trees",
     "wear warm boots", "wore warm boots", "cold"),
    ("foggy", "thick fog hides the road and the hills", "thick fog hid the road and the hills",
     "walk slowly", "walked slowly", "damp"),
]  # fmt: skip
LAB_THINGS = [
    "a big window", "a long desk", "a printer", "a white board", "a small kitchen",
    "a green plant", "a red chair", "a clock on the wall", "a shelf of books",
]  # fmt: skip
PLACES = ["the garden", "the farm", "the park", "the market", "the forest", "the pond"]
OPENERS = ["One morning", "One afternoon", "One day", "Once upon a time"]
FEELINGS = ["happy", "glad", "tired", "calm", "proud", "curious"]
# What goes wrong in a lab story, and what the model does once it is fixed.
TROUBLES = [
    "{computer} was slow, so {he} restarted it.",
    "{computer} was too hot, so {he} opened the window.",
    "{computer} could not find the others, so {he} checked the network.",
]
MODEL_WORK = [
    "{He} asked the model to write a story, and it wrote one.",
    "The model answered {his} questions one word at a time.",
    "{He} gave each computer a few layers of the model.",
]
GREETINGS = [
    ("Hello!", "Hello! I am a small model. I run on the computers in the lab."),
    ("Who are you?", "I am a small model. My layers are shared by the computers."),
    ("What can you do?", "I can write short stories about the lab, fruit and animals."),
]
LAB_FACTS = [
    "The computers work together to run one big model.",
    "Each computer holds a few layers of the model.",
    "The first computer reads the words, and the last computer picks the next word.",
    "The computers talk to each other over the network.",
    "When one computer is busy, the others wait for it.",
    "Every computer has a screen, a keyboard and a fan.",
    "A model is split into layers, and the layers are shared by the computers.",
    "More computers can hold a bigger model.",
    "The model writes one word at a time.",
    "The Macs in the lab are small and quiet.",
]


def a_or_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def join_words(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def fruit_facts(rng: random.Random, fruit: tuple[str, ...]) -> list[str]:
    name, plural, color, taste, grows = fruit
    facts = [
        f"{cap(a_or_an(name))} is a fruit.",
        f"{cap(a_or_an(name))} is {color}.",
        f"{cap(a_or_an(name))} tastes {taste}.",
        f"{cap(plural)} grow {grows}.",
        f"{cap(a_or_an(name))} is {color}, and it tastes {taste}.",
    ]
    return rng.sample(facts, rng.randint(2, 4))


def animal_facts(rng: random.Random, animal: tuple[str, ...]) -> list[str]:
    name, _, sound, _, home, food, habit = animal
    the = cap(a_or_an(name))
    facts = [f"{the} {sound}.", f"{the} lives {home}.", f"{the} {food}.", f"{the} {habit}."]
    return rng.sample(facts, rng.randint(2, 4))


def weather_facts(rng: random.Random, weather: tuple[str, ...]) -> list[str]:
    kind, sky, _, action, _, feel = weather
    facts = [
        f"When it is {kind}, {sky}.",
        f"On a {kind} day, people {action}.",
        f"The air feels {feel} when it is {kind}.",
    ]
    return rng.sample(facts, rng.randint(1, 3))


def lab_facts(rng: random.Random, names: list[str]) -> list[str]:
    things = rng.sample(LAB_THINGS, 2)
    facts = [
        f"The lab has {NUMBERS[len(names) - 2]} {rng.choice(['computers', 'machines', 'Macs'])}.",
        f"The lab has {things[0]} and {things[1]}.",
        f"The computers in the lab are called {join_words(names)}.",
        f"{rng.choice(names)} is the {rng.choice(['oldest', 'newest', 'fastest'])} computer.",
        *rng.sample(LAB_FACTS, 3),
    ]
    return facts[:2] + rng.sample(facts[2:], rng.randint(2, 4))


def lab_story(rng: random.Random) -> str:
    name, he = rng.choice(PEOPLE)
    names = rng.sample(COMPUTERS, rng.randint(2, 6))
    kind, _, sky, *_ = rng.choice(WEATHER)
    fruit, animal = rng.choice(FRUITS), rng.choice(ANIMALS)
    slow = rng.choice(names)
    s = [
        rng.choice([f"{name} works in a small lab.", f"{name} has a job in a lab."]),
        *lab_facts(rng, names)[:3],
        f"One {rng.choice(['morning', 'day'])}, {name} came to the lab early.",
        f"It was {kind} outside, and {sky}.",
        f"{cap(he)} turned on the computers one by one.",
        rng.choice(TROUBLES).format(computer=slow, he=he),
        "Soon all the computers were working together.",
        rng.choice(MODEL_WORK).format(He=cap(he), his=POSSESSIVE[he]),
        f"At noon, {name} ate {a_or_an(fruit[0])}. It was {fruit[3]}.",
    ]
    if rng.random() < 0.6:
        s.append(f"Then {a_or_an(animal[0])} came to the window. It {animal[3]}.")
        s.append(f"{name} smiled and gave it a little food.")
    s.append(f"In the evening, {he} turned off the lights and went home.")
    s.append(f"{name} felt {rng.choice(FEELINGS)}, and the computers rested.")
    return " ".join(s)


def outdoor_story(rng: random.Random) -> str:
    name, he = rng.choice(PEOPLE)
    friend, _ = rng.choice([p for p in PEOPLE if p[0] != name])
    place = rng.choice(PLACES)
    kind, _, sky, _, action, feel = rng.choice(WEATHER)
    fruit, animal = rng.choice(FRUITS), rng.choice(ANIMALS)
    s = [
        f"{rng.choice(OPENERS)}, {name} went to {place} with {friend}.",
        f"It was a {kind} day, and {sky}. They {action}.",
        f"At {place}, they saw {a_or_an(animal[0])}.",
        f"The {animal[0]} {animal[3]} and {rng.choice(['looked at them', 'ran away'])}.",
        f"{friend} said that {a_or_an(animal[0])} {animal[5]}.",
        f"Then they found some {fruit[1]}. The {fruit[1]} were {fruit[2]}.",
        f"{name} ate one, and it was {fruit[3]}.",
        rng.choice(
            [f"They sat down and talked about the {animal[1]}.", "They sang a song on the way."]
        ),
        f"When the sun went down, they went home. {name} was {rng.choice(FEELINGS)}.",
    ]
    return " ".join(s)


def fact_paragraph(rng: random.Random) -> str:
    topic = rng.randrange(4)
    if topic == 0:
        facts = fruit_facts(rng, rng.choice(FRUITS)) + fruit_facts(rng, rng.choice(FRUITS))
    elif topic == 1:
        facts = animal_facts(rng, rng.choice(ANIMALS)) + animal_facts(rng, rng.choice(ANIMALS))
    elif topic == 2:
        facts = weather_facts(rng, rng.choice(WEATHER)) + weather_facts(rng, rng.choice(WEATHER))
    else:
        facts = lab_facts(rng, rng.sample(COMPUTERS, rng.randint(2, 6)))
    return " ".join(facts)


def question_answer(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        name, _, color, _, _ = rng.choice(FRUITS)
        return f"What color is {a_or_an(name)}?", f"{cap(a_or_an(name))} is {color}."
    if kind == 1:
        name, _, sound, *_ = rng.choice(ANIMALS)
        return f"What does {a_or_an(name)} do?", f"{cap(a_or_an(name))} {sound}."
    if kind == 2:
        name, _, _, _, home, food, habit = rng.choice(ANIMALS)
        return (
            f"Tell me about the {name}.",
            f"{cap(a_or_an(name))} lives {home}. It {food}, and it {habit}.",
        )
    if kind == 3:
        kind_, sky, _, action, *_ = rng.choice(WEATHER)
        return f"What happens when it is {kind_}?", f"When it is {kind_}, {sky}. People {action}."
    if kind == 4:
        return rng.choice(GREETINGS)
    return "Tell me a story.", rng.choice([lab_story, outdoor_story])(rng)


def dialogue(rng: random.Random) -> str:
    turns = [question_answer(rng) for _ in range(rng.choice([1, 1, 2]))]
    return f"{EOS}\n".join(f"User: {q}\nAssistant: {a}" for q, a in turns)


def build_corpus(seed: int, target_bytes: int) -> list[str]:
    """Documents of simple English, without BOS/EOS, about ``target_bytes`` in total."""
    rng = random.Random(seed)
    writers = [lab_story, lab_story, outdoor_story, outdoor_story, fact_paragraph, dialogue]
    docs: list[str] = []
    size = 0
    while size < target_bytes:
        doc = rng.choice(writers)(rng)
        docs.append(doc)
        size += len(doc) + 1
    return docs


def corpus_words(docs: list[str]) -> set[str]:
    """Lower-cased words of the corpus, for checking that generations stay on it."""
    return {w for doc in docs for w in re.findall(r"[a-z]+", doc.lower())}


# --- tokenizer -----------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE that prepends ``<s>`` when asked for special tokens, like Llama's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    bos_id = token_id(tokenizer, BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return found


def encode_corpus(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """One stream of ``<s> doc </s>`` documents, as int32 token ids."""
    eos_id = token_id(tokenizer, EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(docs):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


def tokenizer_config(cfg: TrainConfig) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


# --- model and training --------------------------------------------------------------


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": token_id(tokenizer, BOS),
        "eos_token_id": token_id(tokenizer, EOS),
        "torch_dtype": "float16",
    }


def batches(
    tokens: np.ndarray, bos_id: int, cfg: TrainConfig, seed: int
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield (inputs, targets) windows of ``seq_len`` tokens.

    Half the rows start at a document's ``<s>``, so the model learns to begin from a
    prompt; the other half start anywhere, so it also sees the ends of long documents.
    """
    rng = np.random.default_rng(seed)
    last = len(tokens) - cfg.seq_len - 1
    starts = np.flatnonzero(tokens[:last] == bos_id)
    offsets = np.arange(cfg.seq_len + 1)
    half = cfg.batch_size // 2
    while True:
        firsts = np.concatenate(
            [rng.choice(starts, half), rng.integers(0, last, cfg.batch_size - half)]
        )
        rows = tokens[firsts[:, None] + offsets]  # (B, L + 1)
        yield mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def loss_fn(model: Model, inputs: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")


def parameters(model: Model) -> dict[str, mx.array]:
    return dict(cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())))


def train(model: Model, tokens: np.ndarray, bos_id: int, cfg: TrainConfig) -> float:
    """Train in place; return the mean loss of the last 20 steps."""
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-5, cfg.learning_rate, cfg.warmup_steps),
            optim.cosine_decay(
                cfg.learning_rate, cfg.steps - cfg.warmup_steps, cfg.learning_rate * 0.05
            ),
        ],
        [cfg.warmup_steps],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(inputs: mx.array, targets: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, inputs, targets)
        grads, _ = optim.clip_grad_norm(grads, max_norm=1.0)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    recent: list[float] = []
    start = time.perf_counter()
    for i, (inputs, targets) in zip(
        range(cfg.steps), batches(tokens, bos_id, cfg, SEED), strict=False
    ):
        loss = step(inputs, targets)
        mx.eval(state, loss)
        recent = (recent + [cast(float, loss.item())])[-20:]
        if i % 100 == 0 or i == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            logger.info(
                "step %d/%d loss %.3f lr %.2e %.0f s (%.0f tok/s)",
                i + 1, cfg.steps, sum(recent) / len(recent), schedule(i).item(), elapsed,
                (i + 1) * cfg.batch_size * cfg.seq_len / elapsed,
            )  # fmt: skip
    return sum(recent) / len(recent)


def evaluate(model: Model, tokens: np.ndarray, bos_id: int, cfg: TrainConfig) -> float:
    """Mean loss on 8 batches of held-out documents."""
    losses = [
        cast(float, loss_fn(model, x, y).item())
        for _, (x, y) in zip(range(8), batches(tokens, bos_id, cfg, 0), strict=False)
    ]
    return sum(losses) / len(losses)


# --- output --------------------------------------------------------------------------


def save(model: Model, tokenizer: Tokenizer, cfg: TrainConfig, out_dir: Path) -> str:
    """Write the mlx-lm layout into ``out_dir``; return the weights' SHA-256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in parameters(model).items()}
    weights_path = out_dir / "model.safetensors"
    mx.save_safetensors(str(weights_path), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(model_config(cfg, tokenizer), indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(cfg), indent=2) + "\n"
    )
    return hashlib.sha256(weights_path.read_bytes()).hexdigest()


def print_samples(out_dir: Path) -> None:
    from mlx_lm import generate, load

    model, tokenizer = load(str(out_dir))[:2]
    prompts = ["The lab has", "One morning, Mia", "A banana is", "When it is rainy,"]
    for prompt in prompts:
        print(f"--- {prompt!r}\n{generate(model, tokenizer, prompt, max_tokens=60)}")
    messages = [{"role": "user", "content": "Tell me about the cow."}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(f"--- chat {messages[0]['content']!r}\n{generate(model, tokenizer, chat, max_tokens=60)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where to write the model")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    # Short trial runs warm up for a tenth of their steps; the default run for 100.
    warmup = min(TrainConfig.warmup_steps, max(1, args.steps // 10))
    cfg = TrainConfig(steps=args.steps, warmup_steps=warmup)

    mx.random.seed(SEED)  # the initial weights; the corpus and batches have their own RNGs
    docs = build_corpus(SEED, cfg.corpus_bytes)
    held_out = build_corpus(SEED + 1, 100_000)
    logger.info("corpus: %d documents, %d bytes, %d words", len(docs),
                sum(map(len, docs)), len(corpus_words(docs)))  # fmt: skip
    tokenizer = train_tokenizer(docs, cfg.vocab_size)
    bos_id = token_id(tokenizer, BOS)
    tokens = encode_corpus(tokenizer, docs)
    logger.info("tokenizer: %d tokens in the vocabulary, %d in the corpus",
                tokenizer.get_vocab_size(), len(tokens))  # fmt: skip

    model = Model(ModelArgs.from_dict(model_config(cfg, tokenizer)))
    mx.eval(model.parameters())
    n_params = sum(v.size for v in parameters(model).values())
    logger.info("model: %.2fM parameters", n_params / 1e6)
    start = time.perf_counter()
    train_loss = train(model, tokens, bos_id, cfg)
    minutes = (time.perf_counter() - start) / 60
    held_out_loss = evaluate(model, encode_corpus(tokenizer, held_out), bos_id, cfg)
    digest = save(model, tokenizer, cfg, args.out)
    logger.info("trained %d steps in %.1f min: train loss %.3f, held-out loss %.3f",
                cfg.steps, minutes, train_loss, held_out_loss)  # fmt: skip
    logger.info("weights sha256 %s (set DEMO_WEIGHTS_SHA256 in pomona/demo_model.py)", digest)
    print_samples(args.out)


if __name__ == "__main__":
    main()
