// swa: sinks + a sliding window, no blocks (StreamingLLM when sinks > 0).
#include "replay/selector.hpp"

namespace hysparse {
namespace {

class SwaSelector final : public Selector {
 public:
  SwaSelector(const SelectorSpec& spec, const SelectorDefaults& defaults) : Selector(spec, defaults) {
    // Without an explicit window, SWA attends as many recent keys as the budget allows.
    const auto found = spec.params.find("window");
    if (found == spec.params.end() || found->second == "budget") {
      take_choice("window", {"budget"}, "budget");
      window_ = -1;
    } else {
      window_ = take_int("window", 0, 1);
    }
    reject_unknown_keys();
  }
  std::string description() const override {
    return window_ < 0 ? "sinks + the most recent keys, as many as the budget (sliding window)"
                       : "sinks + a fixed sliding window of " + std::to_string(window_) + " keys";
  }
  SelectorInfo info() const override {
    SelectorInfo i;
    i.granularity = "token (contiguous ranges), the same for every head";
    i.budget = window_ < 0 ? "the window is the budget (floor(k/B)*B recent keys); sinks forced on top"
                           : "a fixed window and sinks; the budget is not used";
    i.post_rope = "positions only (original positions: no StreamingLLM position shift)";
    i.footprint = "swa";
    i.source = "StreamingLLM, arXiv 2309.17453 (mit-han-lab/streaming-llm); sinks=0 is plain SWA";
    i.evicts = true;
    return i;
  }
  bool ranks_per_head() const override { return false; }
  bool selects_blocks() const override { return false; }
  void rank(const RankContext& c, Rankings& out) override { out.reset(1, c.rows, 0); }
};

}  // namespace

std::unique_ptr<Selector> make_swa_selector(const SelectorSpec& spec, const SelectorDefaults& defaults) {
  return std::make_unique<SwaSelector>(spec, defaults);
}

}  // namespace hysparse
