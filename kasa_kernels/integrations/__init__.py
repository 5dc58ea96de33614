"""Optional integrations (PEFT, transformers). Each module imports its library lazily."""
