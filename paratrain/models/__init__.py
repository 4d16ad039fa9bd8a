from paratrain.models.gpt import GPT, PRESETS, GPTConfig, build_model, count_params

__all__ = ["GPT", "GPTConfig", "PRESETS", "build_model", "count_params"]
