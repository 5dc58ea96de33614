// Runs one csrc/ host entry point (and so its kernel launches) on the emulator.
//   kasa_emu OP DIR key=value ...
// Every device buffer NAME is the file DIR/NAME.bin, allocated to exactly its size (ASan flags any access past the
// end); `NAME_off=B` passes the pointer B bytes into it (unaligned bases). Buffers the op writes are written back to
// DIR/NAME.out. Workspaces the op needs beside them are allocated here, filled with NaN bytes.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kasa_launch.h"
#include "kat.h"

namespace {

std::map<std::string, std::string> kv;
std::string dir;

struct Buf {
  unsigned char* p = nullptr;
  size_t n = 0;
};
std::map<std::string, Buf> bufs;
std::vector<void*> owned;

const std::string& need(const std::string& k) {
  auto it = kv.find(k);
  if (it == kv.end()) { fprintf(stderr, "kasa_emu: missing %s=\n", k.c_str()); std::exit(2); }
  return it->second;
}
long long geti(const std::string& k) { return std::stoll(need(k)); }
long long geti(const std::string& k, long long def) { return kv.count(k) ? std::stoll(kv[k]) : def; }
double getf(const std::string& k, double def = 0) { return kv.count(k) ? std::stod(kv[k]) : def; }

void* exact_alloc(size_t n, int fill) {
  void* p = nullptr;
  if (posix_memalign(&p, 128, n ? n : 1)) std::abort();
  std::memset(p, fill, n);
  owned.push_back(p);
  return p;
}

// Pointer into file buffer `name` (null if the file does not exist and the buffer is optional).
void* in(const std::string& name, bool optional = false) {
  const std::string path = dir + "/" + name + ".bin";
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) {
    if (optional) return nullptr;
    fprintf(stderr, "kasa_emu: missing %s\n", path.c_str());
    std::exit(2);
  }
  const size_t n = size_t(f.tellg());
  f.seekg(0);
  auto* p = static_cast<unsigned char*>(exact_alloc(n, 0));
  f.read(reinterpret_cast<char*>(p), std::streamsize(n));
  bufs[name] = {p, n};
  return p + geti(name + "_off", 0);
}
template <class T> T* in_t(const std::string& name, bool optional = false) { return static_cast<T*>(in(name, optional)); }

void out(const std::string& name) {
  const Buf& b = bufs.at(name);
  std::ofstream f(dir + "/" + name + ".out", std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.p), std::streamsize(b.n));
}

kasa::DType dtype_of(const std::string& s) {
  if (s == "f16") return kasa::DType::kF16;
  if (s == "bf16") return kasa::DType::kBF16;
  return kasa::DType::kF32;
}

kasa::DropoutArgs dropout() {
  kasa::DropoutArgs d;
  d.seed = in_t<const int64_t>("seed", true);
  if (d.seed) {
    d.threshold = uint32_t(geti("threshold"));
    d.keep_scale = float(getf("keep_scale"));
  }
  return d;
}

void run_gemm() {
  kasa::GemmLowrankArgs a{};
  a.M = int(geti("M")); a.N = int(geti("N")); a.K = int(geti("K")); a.R = int(geti("R"));
  a.x = in("x"); a.ldx = geti("ldx");
  a.w = in("w"); a.ldw = geti("ldw");
  a.lx = in("lx", true); a.ldlx = geti("ldlx", 0);  // absent for the adapter-off base GEMM (R = 0)
  a.lw = in("lw", true); a.ldlw = geti("ldlw", 0);
  a.bias = in("bias", true);
  a.out = in("out"); a.ldo = geti("ldo");
  const bool fwd = geti("fwd") != 0;
  a.drop = dropout();
  const std::string dt = need("dt");
  if (dt == "f16") kasa::gemm_lowrank_f16(fwd, a, nullptr);
  else if (dt == "bf16") kasa::gemm_lowrank_bf16(fwd, a, nullptr);
  else kasa::gemm_lowrank_f32(fwd, dt == "tf32" ? kasa::Fp32Math::kTF32 : kasa::Fp32Math::kFFMA, a, nullptr);
  out("out");
}

void run_shrink() {
  const kasa::DType dt = dtype_of(need("dt"));
  kasa::ShrinkArgs a{};
  a.M = int(geti("M")); a.K = int(geti("K")); a.R = int(geti("R"));
  a.x = in("x"); a.ldx = geti("ldx");
  a.a = in_t<const float>("a"); a.sd = in_t<const float>("sd");
  a.h = in_t<float>("h"); a.s = in("s");
  a.drop = dropout();
  a.splits = int(geti("splits", -1));
  if (a.splits < 0) a.splits = kasa::lowrank_shrink_splits(dt, a.M, a.K, a.R);  // as bindings.cpp does
  if (a.splits > 1) a.partial = static_cast<float*>(exact_alloc(size_t(a.splits) * a.M * a.R * 4, 0xFF));
  printf("splits=%d\n", a.splits);
  kasa::lowrank_shrink(dt, a, nullptr);
  out("h");
  out("s");
}

void run_dy() {
  const kasa::DType dt = dtype_of(need("dt"));
  kasa::DyPassArgs a{};
  a.M = int(geti("M")); a.N = int(geti("N")); a.R = int(geti("R"));
  a.g = in("g"); a.ldg = geti("ldg");
  a.b = in_t<const float>("b"); a.h = in_t<const float>("h"); a.d = in_t<const float>("d");
  a.scaling = float(getf("scaling"));
  a.gh = in_t<float>("gh");
  a.gh_lowp = in("gh_lowp", true);
  a.db = in_t<float>("db");  // zeroed by the caller, as bindings.cpp does
  float* dd = in_t<float>("dd");
  const int64_t tiles = (a.M + kasa::kDyRows - 1) / kasa::kDyRows;
  a.dd_partial = static_cast<float*>(exact_alloc(size_t(tiles) * a.R * 4, 0xFF));
  const bool det = geti("det", 0) != 0;
  a.db_partial = det ? static_cast<float*>(exact_alloc(size_t(tiles) * a.N * a.R * 4, 0xFF)) : nullptr;
  a.splits = int(geti("splits", -1));
  if (a.splits < 0) a.splits = kasa::dy_pass_splits(dt, a.M, a.N, a.R);  // as bindings.cpp does
  a.gz_partial = static_cast<float*>(exact_alloc(size_t(a.splits) * a.M * a.R * 4, 0xFF));
  printf("splits=%d\n", a.splits);
  kasa::dy_pass(dt, a, nullptr);
  kasa::sum_partials(a.dd_partial, tiles, a.R, dd, nullptr);
  if (det) kasa::sum_partials(a.db_partial, tiles, int64_t(a.N) * a.R, a.db, nullptr);
  out("gh");
  if (a.gh_lowp) out("gh_lowp");
  out("db");
  out("dd");
}

void run_da() {
  const kasa::DType dt = dtype_of(need("dt"));
  kasa::LowrankDaArgs a{};
  a.M = int(geti("M")); a.K = int(geti("K")); a.R = int(geti("R"));
  a.x = in("x"); a.ldx = geti("ldx");
  a.gh = in_t<const float>("gh");
  a.da = in_t<float>("da");
  a.drop = dropout();
  a.splits = int(geti("splits", -1));
  if (a.splits < 0) a.splits = kasa::lowrank_da_splits(dt, a.M, a.K, a.R);
  if (a.splits > 1) a.partial = static_cast<float*>(exact_alloc(size_t(a.splits) * a.R * a.K * 4, 0xFF));
  printf("splits=%d\n", a.splits);
  kasa::lowrank_da(dt, a, nullptr);
  if (a.splits > 1) kasa::sum_partials(a.partial, a.splits, int64_t(a.R) * a.K, a.da, nullptr);
  out("da");
}

void run_reg() {
  const int n = int(geti("layers"));
  std::vector<kasa::RegLayer> layers(n);
  for (int l = 0; l < n; ++l) {
    const std::string s = std::to_string(l);
    kasa::RegLayer& L = layers[l];
    std::istringstream spec(need("layer" + s));  // r,K,N,dtype_a,dtype_b,dtype_d
    char c;
    spec >> L.r >> c >> L.K >> c >> L.N >> c >> L.dtype_a >> c >> L.dtype_b >> c >> L.dtype_d;
    L.a = in("a" + s); L.b = in("b" + s); L.d = in("d" + s);
    L.ga = in_t<float>("ga" + s); L.gb = in_t<float>("gb" + s); L.gd = in_t<float>("gd" + s);
    L.gram_a = static_cast<float*>(exact_alloc(size_t(L.r) * L.r * 4, 0xFF));
    L.gram_b = static_cast<float*>(exact_alloc(size_t(L.r) * L.r * 4, 0xFF));
  }
  kasa::RegArgs a{};
  a.layers = layers.data();
  a.n_layers = n;
  a.beta = float(getf("beta"));
  a.gamma = float(getf("gamma"));
  a.official = geti("official", 0) != 0;
  a.layer_terms = static_cast<float*>(exact_alloc(size_t(n) * 4, 0xFF));
  a.counter = static_cast<unsigned*>(exact_alloc(4, 0));
  a.loss = in_t<float>("loss");
  const int reps = int(geti("reps", 1));  // the counter must be back at 0 for the next launch
  for (int i = 0; i < reps; ++i) kasa::regularizer(a, nullptr);
  if (*a.counter != 0) { fprintf(stderr, "kasa_emu: regularizer left its counter at %u\n", *a.counter); std::exit(3); }
  for (int l = 0; l < n; ++l) {
    const std::string s = std::to_string(l);
    out("ga" + s); out("gb" + s); out("gd" + s);
  }
  out("loss");
}

// Known-answer runs of single instructions (kat.cpp): which=ldmatrix|mma|ldmatrix_mma|cp_async.
void run_kat() {
  const std::string which = need("which");
  if (which == "ldmatrix") {
    kat_ldmatrix(int(geti("n")), geti("trans") != 0, in_t<const uint16_t>("in"), in_t<const int>("rows"),
                 in_t<uint32_t>("out"));
  } else if (which == "mma") {
    kat_mma(int(geti("kind")), in_t<const uint32_t>("a"), in_t<const uint32_t>("b"), in_t<const float>("c"),
            in_t<float>("out"));
  } else if (which == "ldmatrix_mma") {
    kat_ldmatrix_mma(int(geti("kind")), geti("b_kmajor") != 0, in_t<const unsigned char>("a"),
                     in_t<const unsigned char>("b"), in_t<float>("out"));
  } else if (which == "cp_async") {
    kat_cp_async(in_t<const unsigned char>("src"), in_t<unsigned char>("out"));
  } else {
    fprintf(stderr, "kasa_emu: unknown known-answer test %s\n", which.c_str());
    std::exit(2);
  }
  out("out");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) { fprintf(stderr, "usage: kasa_emu OP DIR key=value ...\n"); return 2; }
  const std::string op = argv[1];
  dir = argv[2];
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (eq == std::string::npos) { fprintf(stderr, "kasa_emu: bad argument %s\n", argv[i]); return 2; }
    kv[a.substr(0, eq)] = a.substr(eq + 1);
  }
  emu::sm_count = int(geti("sms", 4));
  emu::cc = int(geti("cc", 86));
  if (op == "gemm") run_gemm();
  else if (op == "shrink") run_shrink();
  else if (op == "dy") run_dy();
  else if (op == "da") run_da();
  else if (op == "reg") run_reg();
  else if (op == "kat") run_kat();
  else { fprintf(stderr, "kasa_emu: unknown op %s\n", op.c_str()); return 2; }
  for (void* p : owned) free(p);
  return 0;
}
