// A bounded, deterministic driver for fuzz_attn_ftb.cpp (no libFuzzer needed): N pseudo-random inputs from a
// fixed seed, or the given input files (to reproduce a failure).
//
//   fuzz_attn_ftb --seeds SEED.gguf [SEED2.gguf ...] --runs N [--seed S] [--work DIR] [--keep-failing DIR]
//   fuzz_attn_ftb --seeds SEED.gguf [...] INPUT [INPUT ...]
//
// Before each input is run it is written to DIR/current-input.bin (with --keep-failing), so that the input of a
// crash (an abort of a failed check, or a sanitizer report with halt_on_error) stays there; the file is removed
// when all runs pass. Prints one line per 100 runs, the outcome counters ("stat NAME VALUE") and, last,
// "fuzz: N executions, 0 crashes".
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerInitialize(int * argc, char *** argv);
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);
extern "C" void zt_fuzz_print_stats(FILE * out);

namespace {

std::vector<uint8_t> random_input(std::mt19937_64 & rng) {
    // mostly short inputs (the choices), sometimes long ones (many raw values)
    const uint64_t r = rng();
    size_t n;
    switch (r % 8) {
        case 0: n = 1 + (size_t) (rng() % 16); break;
        case 1: n = 1 + (size_t) (rng() % 8192); break;
        default: n = 1 + (size_t) (rng() % 512); break;
    }
    std::vector<uint8_t> v(n);
    for (auto & b : v) {
        b = (uint8_t) rng();
    }
    return v;
}

void usage() {
    std::fprintf(stderr,
        "usage: fuzz_attn_ftb --seeds SEED.gguf [...] (--runs N [--seed S] | INPUT...) [--work DIR] [--keep-failing DIR]\n");
    std::exit(2);
}

} // namespace

int main(int argc, char ** argv) {
    std::vector<std::string> seeds, inputs;
    uint64_t runs = 0, seed = 1;
    std::string work = "/tmp", keep;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                usage();
            }
            return argv[++i];
        };
        if (a == "--seeds") {
            while (i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0) {
                seeds.push_back(argv[++i]);
                if (seeds.back().size() < 5 || seeds.back().substr(seeds.back().size() - 5) != ".gguf") {
                    inputs.push_back(seeds.back());  // not a model: an input to replay
                    seeds.pop_back();
                }
            }
        } else if (a == "--runs") {
            runs = std::strtoull(next().c_str(), nullptr, 10);
        } else if (a == "--seed") {
            seed = std::strtoull(next().c_str(), nullptr, 10);
        } else if (a == "--work") {
            work = next();
        } else if (a == "--keep-failing") {
            keep = next();
        } else if (a.rfind("--", 0) == 0) {
            usage();
        } else {
            inputs.push_back(a);
        }
    }
    if (seeds.empty() || (runs == 0 && inputs.empty())) {
        usage();
    }
    std::string joined;
    for (const auto & s : seeds) {
        joined += (joined.empty() ? "" : ":") + s;
    }
    setenv("ZT_FUZZ_SEEDS", joined.c_str(), 1);
    setenv("ZT_FUZZ_WORK", work.c_str(), 1);
    LLVMFuzzerInitialize(&argc, &argv);

    const auto t0 = std::chrono::steady_clock::now();
    const std::string current = keep.empty() ? std::string() : keep + "/current-input.bin";
    uint64_t done = 0;
    auto run = [&](const std::vector<uint8_t> & data) {
        if (!current.empty()) {
            std::ofstream(current, std::ios::binary).write((const char *) data.data(), (std::streamsize) data.size());
        }
        LLVMFuzzerTestOneInput(data.data(), data.size());
        ++done;
        if (done % 100 == 0) {
            const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            std::printf("fuzz: %llu executions in %.1f s\n", (unsigned long long) done, s);
            std::fflush(stdout);
        }
    };
    for (const auto & path : inputs) {
        std::ifstream f(path, std::ios::binary);
        if (!f) {
            std::fprintf(stderr, "fuzz: cannot read %s\n", path.c_str());
            return 2;
        }
        run(std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>()));
    }
    std::mt19937_64 rng(seed);
    for (uint64_t i = 0; i < runs; ++i) {
        run(random_input(rng));
    }
    if (!current.empty()) {
        std::remove(current.c_str());
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    zt_fuzz_print_stats(stdout);
    std::printf("stat seconds_x10 %llu\n", (unsigned long long) (s * 10));
    std::printf("fuzz: %llu executions, 0 crashes\n", (unsigned long long) done);
    return 0;
}
