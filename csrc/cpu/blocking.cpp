// The CPU caches the kernels block for, and the forward's query block from them (blocking.h).
#include "blocking.h"

#include <c10/util/Exception.h>

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>

namespace selfattn {
namespace {

constexpr int64_t kKiB = 1024;
constexpr int64_t kDefaultL1d = 32 * kKiB, kDefaultL2 = 512 * kKiB;
// Below 32 query columns the tile GEMM's register tile runs mostly empty and the per-tile softmax
// passes dominate: no cache is helped enough to pay for that.
constexpr int64_t kMinBlockQ = 32;

std::string read_line(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

// "32K", "1024K", "2M" -> bytes; 0 if unreadable.
int64_t parse_size(const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value <= 0) {
    return 0;
  }
  switch (*end) {
    case 'K':
      return value * kKiB;
    case 'M':
      return value * kKiB * kKiB;
    case 'G':
      return value * kKiB * kKiB * kKiB;
    default:
      return value;
  }
}

// How many CPUs of a sysfs list ("0-1", "0,64", "3") this process may run on.
int64_t usable_cpus_in(const std::string& list, const cpu_set_t& allowed) {
  int64_t count = 0;
  std::stringstream items(list);
  for (std::string item; std::getline(items, item, ',');) {
    const size_t dash = item.find('-');
    const long first = std::strtol(item.c_str(), nullptr, 10);
    const long last = dash == std::string::npos ? first : std::strtol(item.c_str() + dash + 1, nullptr, 10);
    for (long cpu = first; cpu <= last && cpu < CPU_SETSIZE; ++cpu) {
      count += cpu >= 0 && CPU_ISSET(cpu, &allowed) ? 1 : 0;
    }
  }
  return std::max<int64_t>(count, 1);
}

// CPU 0's (the first CPU this process may run on) L1d and L2 from sysfs; zeros where absent.
CpuCaches sysfs_caches() {
  CpuCaches caches;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  int first_cpu = 0;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
    while (first_cpu < CPU_SETSIZE && !CPU_ISSET(first_cpu, &allowed)) {
      ++first_cpu;
    }
  } else {
    CPU_SET(0, &allowed);
  }
  const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(first_cpu) + "/cache/index";
  for (int index = 0; index < 8; ++index) {
    const std::string dir = base + std::to_string(index) + "/";
    const std::string level = read_line(dir + "level"), type = read_line(dir + "type");
    if (level.empty()) {
      break;
    }
    const int64_t size = parse_size(read_line(dir + "size"));
    const int64_t sharers = usable_cpus_in(read_line(dir + "shared_cpu_list"), allowed);
    if (level == "1" && type == "Data") {
      caches.l1d = size;
      caches.sharers = std::max(caches.sharers, sharers);
    } else if (level == "2" && type != "Instruction") {
      caches.l2 = size;
      caches.sharers = std::max(caches.sharers, sharers);
    }
  }
  caches.source = "sysfs";
  return caches;
}

CpuCaches detect_caches() {
  const char* setting = std::getenv("SELFATTN_CPU_CACHES");
  if (setting != nullptr && *setting != '\0') {
    long long l1d_kib = 0, l2_kib = 0, sharers = 1;
    char extra = 0;
    const int read = std::sscanf(setting, "%lld,%lld,%lld%c", &l1d_kib, &l2_kib, &sharers, &extra);
    TORCH_CHECK((read == 2 || read == 3) && l1d_kib > 0 && l2_kib > 0 && sharers > 0 && sharers <= 8,
                "SELFATTN_CPU_CACHES must be 'L1D_KIB,L2_KIB' or 'L1D_KIB,L2_KIB,SHARERS' (per-core L1d and L2 "
                "in KiB, CPUs sharing them 1 to 8), e.g. '32,512', got '",
                setting, "'");
    CpuCaches caches{l1d_kib * kKiB, l2_kib * kKiB, sharers, "SELFATTN_CPU_CACHES"};
    return clamp_caches(caches);
  }
  CpuCaches caches = sysfs_caches();
  if (caches.l1d <= 0 || caches.l2 <= 0) {
    caches = CpuCaches{kDefaultL1d, kDefaultL2, 1, "default"};
  }
  return clamp_caches(caches);
}

std::mutex caches_mutex;
CpuCaches current_caches;
bool caches_known = false;

}  // namespace

CpuCaches clamp_caches(CpuCaches caches) {
  caches.l1d = std::clamp(caches.l1d, kMinL1d, kMaxL1d);
  caches.l2 = std::clamp(caches.l2, kMinL2, kMaxL2);
  caches.sharers = std::clamp<int64_t>(caches.sharers, 1, 8);
  return caches;
}

CpuCaches cpu_caches() {
  std::lock_guard<std::mutex> lock(caches_mutex);
  if (!caches_known) {
    current_caches = detect_caches();
    caches_known = true;
  }
  return current_caches;
}

CpuCaches set_cpu_caches(int64_t l1d, int64_t l2, int64_t sharers) {
  std::lock_guard<std::mutex> lock(caches_mutex);
  if (l1d == 0 && l2 == 0 && sharers == 0) {
    current_caches = detect_caches();
  } else {
    TORCH_CHECK(l1d > 0 && l2 > 0 && sharers > 0,
                "_cpu_caches: l1d, l2 and sharers must be positive (or all 0 "
                "to detect again), got ",
                l1d, ", ", l2, ", ", sharers);
    current_caches = clamp_caches(CpuCaches{l1d, l2, sharers, "set"});
  }
  caches_known = true;
  return current_caches;
}

int64_t forward_query_block(const CpuCaches& caches, int64_t dim, int64_t dim_v_padded, int64_t elem_bytes,
                            int64_t vec_width, int64_t block_k, int64_t max_block_q) {
  const int64_t l1_share = caches.l1d / caches.sharers, l2_share = caches.l2 / caches.sharers;
  // L1: the score tile in half the L1d share.
  const int64_t min_block_q = std::max(kMinBlockQ, vec_width);
  int64_t block_q = l1_share / 2 / (block_k * elem_bytes) / vec_width * vec_width;
  block_q = std::clamp(block_q, min_block_q, std::max(min_block_q, max_block_q / vec_width * vec_width));
  // L2: the work item's set in half the L2 share.
  const auto item_bytes = [&](int64_t bq) {
    return elem_bytes * (dim * bq + block_k * bq + bq * dim_v_padded + block_k * (dim + dim_v_padded));
  };
  while (block_q - vec_width >= min_block_q && item_bytes(block_q) > l2_share / 2) {
    block_q -= vec_width;
  }
  return block_q;
}

std::vector<int64_t> cpu_caches_op(int64_t l1d, int64_t l2, int64_t sharers) {
  const CpuCaches caches = l1d < 0 && l2 < 0 && sharers < 0 ? cpu_caches() : set_cpu_caches(l1d, l2, sharers);
  return {caches.l1d, caches.l2, caches.sharers};
}

int64_t cpu_forward_query_block_op(std::vector<int64_t> caches, int64_t dim, int64_t dim_v, int64_t elem_bytes,
                                   int64_t vec_width) {
  TORCH_CHECK(caches.size() == 3 && caches[0] > 0 && caches[1] > 0 && caches[2] > 0,
              "_cpu_forward_query_block: caches must be [l1d, l2, sharers], all positive");
  TORCH_CHECK(dim > 0 && dim_v > 0 && elem_bytes > 0 && vec_width > 0,
              "_cpu_forward_query_block: dim, dim_v, elem_bytes and vec_width must be positive");
  const CpuCaches given = clamp_caches(CpuCaches{caches[0], caches[1], caches[2], "given"});
  const int64_t dim_v_padded = (dim_v + vec_width - 1) / vec_width * vec_width;
  return forward_query_block(given, dim, dim_v_padded, elem_bytes, vec_width, 64, 128);
}

std::string describe_cpu_blocking(int64_t vec_width) {
  const CpuCaches caches = cpu_caches();
  std::ostringstream text;
  text << "L1d " << caches.l1d / kKiB << " KiB, L2 " << caches.l2 / kKiB << " KiB per core";
  if (caches.sharers > 1) {
    text << " shared by " << caches.sharers << " CPUs";
  }
  text << " (" << caches.source << "); float32 forward query block "
       << forward_query_block(caches, 64, 64, 4, vec_width, 64, 128) << " at D = 64, "
       << forward_query_block(caches, 128, 128, 4, vec_width, 64, 128) << " at D = 128";
  return text.str();
}

}  // namespace selfattn
