"""The spoken questions the CPU benchmarks ask (spoken by Piper inside each benchmark)."""

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is the tallest mountain in the world?",
    "Can you recommend a good book for the weekend?",
    "Why is the sky blue?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "How far away is the moon?",
]
