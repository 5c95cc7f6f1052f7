"""task_plugin: your own model and data as a snake-flower task (snake_flower example)."""
