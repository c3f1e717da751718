// InstallFence is header-only; this file keeps the library's source list stable.
#include "server/install_fence.h"
