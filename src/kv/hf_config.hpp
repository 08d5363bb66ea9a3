#pragma once
// A KvModel from a Hugging Face config.json. Understood keys (in the root or, for
// multimodal configs, in "text_config"):
//   num_hidden_layers (n_layer), num_attention_heads (n_head), num_key_value_heads
//   (default: num_attention_heads), head_dim (default: hidden_size / num_attention_heads),
//   v_head_dim, kv_lora_rank + qk_rope_head_dim + qk_nope_head_dim (MLA),
//   layer_types (full_attention | sliding_attention | chunked_attention),
//   sliding_window, sliding_window_pattern (Gemma 3: layer i global when (i+1) % P == 0),
//   use_sliding_window + max_window_layers (Qwen2/3), attention_chunk_size (Llama 4),
//   model_type gemma2 (even layers sliding).
// Anything else that changes the KV cache and is not understood is an Error(kInput)
// naming the file and key.
#include <string>

#include <nlohmann/json.hpp>

#include "kv/kv.hpp"

namespace hysparse {

KvModel kv_model_from_hf_config(const std::string& path);
// `where` names the source in errors (a path).
KvModel kv_model_from_hf_json(const nlohmann::json& config, const std::string& where);

}  // namespace hysparse
