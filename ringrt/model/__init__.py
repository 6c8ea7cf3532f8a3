"""The Llama-family decoder, its attention layer and Hugging Face loading/saving."""
