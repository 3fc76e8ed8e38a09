"""Builds a small byte-level BPE tokenizer offline, for tools that insist on a Hugging Face tokenizer (aiperf).

Usage: python make_tokenizer.py HF_HUB_CACHE REPO_ID [CORPUS_FILE...]
Trains on the first lines of the given text files (e.g. the Shakespeare corpus aiperf ships) plus a few built-in
sentences, and saves it with transformers' save_pretrained as snapshot `main` of REPO_ID in the Hugging Face cache
layout under HF_HUB_CACHE. Tools then load it by name with HF_HUB_CACHE=... HF_HUB_OFFLINE=1, without any network.
(A plain directory path would do for transformers, but aiperf 0.13 in offline mode sends every name, paths included,
through huggingface_hub.snapshot_download, which rejects a path: "Repo id must be in the form 'namespace/repo_name'".)
Byte-level: any text encodes (no unknown token) and decodes back exactly.
"""
import itertools
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A gateway sits in front of inference servers and routes each request to a healthy backend.",
    "Streaming responses arrive as server-sent events, one token at a time.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
]
COMMIT = "0" * 40  # the snapshot's fake commit hash; refs/main points at it


def main():
    cache, repo, corpora = sys.argv[1], sys.argv[2], sys.argv[3:]
    lines = list(SENTENCES)
    for path in corpora:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(itertools.islice((line.strip() for line in f if line.strip()), 20000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=131072)
    text = "Hello, gateway! ünïcödé"
    assert fast.decode(fast.encode(text)) == text, "round trip failed"
    repo_dir = os.path.join(cache, "models--" + repo.replace("/", "--"))
    fast.save_pretrained(os.path.join(repo_dir, "snapshots", COMMIT))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(COMMIT)
    print(f"tokenizer {repo}: {tok.get_vocab_size()} tokens, trained on {len(lines)} lines, in {repo_dir}")


if __name__ == "__main__":
    main()
