"""Inputs the methods read: XCOPA, evaluation items and templates, word lists, token sets, prompts."""
