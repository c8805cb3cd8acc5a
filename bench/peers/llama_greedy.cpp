// llama_greedy: the llama.cpp side of bench/peers/run.py. Loads a GGUF (mmap, llama.cpp's
// default), runs the given prompt token ids through one llama_decode, then greedy-decodes
// tokens one at a time (argmax of the logits, ties to the lower id), and prints one JSON line:
//   {"load_s": .., "prefill_s": .., "decode_s_per_token": [..], "tokens": [..], "peak_rss_mb": ..}
// decode_s_per_token holds one entry per decode step (generated tokens - 1: the last token is
// chosen but never fed back, as foe_run does). The KV cache is f32 so that the logits compare
// with foe's and transformers' fp32 ones exactly enough for greedy agreement.
//
// usage: llama_greedy -m MODEL.gguf -t THREADS -n NEW_TOKENS -p ID,ID,...
// Built by run.py: g++ -O2 -std=c++17 -I$LLAMA_CPP_DIR/include -I$LLAMA_CPP_DIR/ggml/include
//   llama_greedy.cpp -L$LLAMA_BIN -lllama -lggml -lggml-base -Wl,-rpath,$LLAMA_BIN
#include "llama.h"

#include <sys/resource.h>

#include <chrono>
#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

[[noreturn]] void fail(const std::string& what)
{
    std::fprintf(stderr, "llama_greedy: %s\n", what.c_str());
    std::exit(1);
}

void usage()
{
    std::fprintf(stderr, "usage: llama_greedy -m MODEL.gguf -t THREADS -n NEW_TOKENS -p ID,ID,... [-v]\n");
    std::exit(2);
}

// argmax, ties to the lower id (the first maximum).
llama_token argmax(const float* logits, int n)
{
    int best = 0;
    for (int i = 1; i < n; ++i)
        if (logits[i] > logits[best]) best = i;
    return best;
}

bool verbose = false;
void quiet_log(ggml_log_level level, const char* text, void*)
{
    if (verbose || level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

}  // namespace

int main(int argc, char** argv)
{
    std::setlocale(LC_NUMERIC, "C");
    std::string model_path;
    int threads = 1;
    int n_new = 8;
    std::vector<llama_token> prompt;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "-v") {
            verbose = true;
            continue;
        }
        if (i + 1 >= argc) usage();
        const char* v = argv[++i];
        if (a == "-m") model_path = v;
        else if (a == "-t") threads = std::atoi(v);
        else if (a == "-n") n_new = std::atoi(v);
        else if (a == "-p") {
            std::string s = v;
            for (std::size_t pos = 0; pos <= s.size();) {
                std::size_t comma = s.find(',', pos);
                if (comma == std::string::npos) comma = s.size();
                if (comma > pos) prompt.push_back(static_cast<llama_token>(std::atoi(s.substr(pos, comma - pos).c_str())));
                pos = comma + 1;
            }
        } else usage();
    }
    if (model_path.empty() || prompt.empty() || threads < 1 || n_new < 1) usage();

    llama_log_set(quiet_log, nullptr);
    const auto load_start = clock_type::now();
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model* model = llama_model_load_from_file(model_path.c_str(), mp);
    if (model == nullptr) fail("unable to load " + model_path);
    const llama_vocab* vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (llama_token id : prompt)
        if (id < 0 || id >= n_vocab) fail("prompt id " + std::to_string(id) + " outside [0, " + std::to_string(n_vocab) + ")");

    const int n_prompt = static_cast<int>(prompt.size());
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(n_prompt + n_new);
    cp.n_batch = static_cast<uint32_t>(n_prompt);  // the whole prompt in one llama_decode
    cp.n_ubatch = static_cast<uint32_t>(n_prompt);  // and in one graph
    cp.n_seq_max = 1;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.no_perf = true;
    llama_context* ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) fail("unable to create the llama_context");
    const double load_s = seconds_since(load_start);

    // Prefill: every prompt position in one batch, logits for the last one only.
    llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; ++i) {
        batch.token[i] = prompt[static_cast<std::size_t>(i)];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = i + 1 == n_prompt;
    }
    batch.n_tokens = n_prompt;
    const auto prefill_start = clock_type::now();
    if (const int rc = llama_decode(ctx, batch); rc != 0) fail("llama_decode (prompt) returned " + std::to_string(rc));
    const float* logits = llama_get_logits_ith(ctx, -1);
    if (logits == nullptr) fail("no logits after the prompt");
    std::vector<llama_token> tokens{argmax(logits, n_vocab)};
    const double prefill_s = seconds_since(prefill_start);

    // Decode: one token at a time, each timed (llama_decode, the logits, the argmax).
    std::vector<double> step_s;
    for (int n = 1; n < n_new; ++n) {
        batch.token[0] = tokens.back();
        batch.pos[0] = n_prompt + n - 1;
        batch.n_seq_id[0] = 1;
        batch.seq_id[0][0] = 0;
        batch.logits[0] = 1;
        batch.n_tokens = 1;
        const auto t = clock_type::now();
        if (const int rc = llama_decode(ctx, batch); rc != 0) fail("llama_decode (step) returned " + std::to_string(rc));
        logits = llama_get_logits_ith(ctx, -1);
        if (logits == nullptr) fail("no logits after a decode step");
        tokens.push_back(argmax(logits, n_vocab));
        step_s.push_back(seconds_since(t));
    }

    rusage usage_now{};
    getrusage(RUSAGE_SELF, &usage_now);
    std::printf("{\"engine\": \"llama.cpp\", \"threads\": %d, \"prompt_tokens\": %d, \"load_s\": %.6f, \"prefill_s\": %.6f, "
                "\"decode_s_per_token\": [",
                threads, n_prompt, load_s, prefill_s);
    for (std::size_t i = 0; i < step_s.size(); ++i) std::printf("%s%.6f", i ? ", " : "", step_s[i]);
    std::printf("], \"tokens\": [");
    for (std::size_t i = 0; i < tokens.size(); ++i) std::printf("%s%d", i ? ", " : "", tokens[i]);
    std::printf("], \"peak_rss_mb\": %.1f}\n", static_cast<double>(usage_now.ru_maxrss) / 1024.0);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
