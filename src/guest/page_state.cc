#include "guest/page_state.h"

namespace faultline {

const char* to_string(PageState state) {
  switch (state) {
    case PageState::kUntouched: return "untouched";
    case PageState::kSnapshot: return "snapshot";
    case PageState::kZero: return "zero";
    case PageState::kRemoved: return "removed";
  }
  return "?";
}

}  // namespace faultline
