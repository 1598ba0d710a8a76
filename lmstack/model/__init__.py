"""The model: weights, tokenizer, Llama forward pass and attention."""
