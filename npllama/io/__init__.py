"""Files: the npllama weights file (weights.py) and the formats it is imported from and exported to,
one module each (hf.py, meta.py, llama2c.py), the containers they use (safetensors_file.py,
torch_pickle.py), tokenizers (tokenizer.py), and atomic writes (files.py)."""
