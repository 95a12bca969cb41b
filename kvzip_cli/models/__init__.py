"""The models kvc runs: `files` (packaged GGUFs and where conversions are kept), `loading` (a name → a loaded model),
`gguf_tokenizer` (tokenizers as llama.cpp runs them), `families` (the architectures kvc is tested on),
`fingerprint` (what a file records of its model)."""
