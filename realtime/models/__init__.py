"""Model code: the Qwen2 decoder, the Step-Audio family and the fast decode step."""
