#pragma once
// Scheduler: continuous batching over a paged KV cache, independent of the backend.
//
// Requests arrive with a prompt and a number of tokens to generate. Every step the scheduler
// builds one ragged Batch under a token budget:
//   1. one token for every running request that is decoding (its last generated token);
//   2. the next chunk of every running request still in its prompt (chunked prefill);
//   3. new requests, oldest arrival first, while a slot, pages and budget last.
// Before a step every sequence's pages are grown to hold what it appends; when the pool runs
// out, the request admitted last is preempted: its pages are freed and it waits again at the
// front of the queue, to recompute its prompt and the tokens it generated (vLLM's recompute).
// After the step each sequence whose chunk reached the end of its known tokens gets its next
// token (greedy, ties toward the lower id) from the last row of its chunk; a request that has
// all its tokens finishes and frees its slot and pages.
//
// Because a step computes every row as that row alone would (foe's batch-invariant GEMM and
// per-row attention), the tokens do not depend on batching, chunking or preemption: each request
// gets the tokens generate() gives it alone (tested).
//
// Time is the caller's: run() asks a Clock for the time before and after every step, so the
// same loop measures a model (a steady clock) or simulates one (a virtual clock advanced by a
// cost model's step time). Per request it records the arrival, the time of every generated
// token and the preemptions: TTFT = first token - arrival; TBT = the gaps between tokens.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "foe/core/error.hpp"
#include "foe/core/tensor.hpp"
#include "foe/layer/batch.hpp"
#include "foe/serve/block_manager.hpp"

namespace foe::serve {

struct Request {
    index_t id = 0;
    double arrival = 0.0;  ///< seconds, on the run's clock
    std::vector<std::int32_t> prompt;
    index_t max_new_tokens = 1;
};

struct SchedulerOptions {
    index_t token_budget = 512;  ///< tokens of one step, prefill chunks and decodes together
    /// Stop generation after any of these tokens (kept); empty: every request runs to its length.
    std::vector<std::int32_t> stop_tokens;
};

/// What happened to one request.
struct RequestRecord {
    index_t id = 0;
    double arrival = 0.0;
    index_t prompt_tokens = 0;
    std::vector<std::int32_t> tokens;  ///< generated
    std::vector<double> token_times;   ///< when each generated token was known (end of its step)
    index_t preemptions = 0;

    [[nodiscard]] double ttft() const { return token_times.at(0) - arrival; }
    /// Gaps between consecutive tokens (empty for one token).
    [[nodiscard]] std::vector<double> tbt() const
    {
        std::vector<double> gaps;
        for (std::size_t i = 1; i < token_times.size(); ++i) gaps.push_back(token_times[i] - token_times[i - 1]);
        return gaps;
    }
};

/// One step as the scheduler built it: the batch (block tables attached), its token ids, and for
/// each chunk the request it serves and whether its last row yields a new token.
struct StepPlan {
    Batch batch;
    std::vector<std::int32_t> tokens;
    std::vector<index_t> request;  ///< [chunks] index into the scheduler's records
    std::vector<bool> samples;     ///< [chunks] the chunk ends at the last known token
    [[nodiscard]] index_t prefill_tokens() const noexcept { return prefill_; }
    [[nodiscard]] index_t decode_tokens() const noexcept { return batch.tokens() - prefill_; }

private:
    friend class Scheduler;
    index_t prefill_ = 0;
};

class Scheduler {
public:
    /// The block manager's slots bound the sequences running at once; its pool, their pages.
    Scheduler(BlockManager& pages, SchedulerOptions options = {}) : pages_(pages), options_(std::move(options))
    {
        require<InvalidArgument>(options_.token_budget > 0, "the token budget per step (", options_.token_budget,
                                 ") must be positive");
        slot_free_.assign(static_cast<std::size_t>(pages_.slots()), true);
    }

    /// Queues a request. CapacityError when it could never fit the pool (prompt + max_new_tokens
    /// positions), InvalidArgument for an empty prompt, a non-positive length or an arrival that
    /// is not finite or goes back in time.
    void submit(Request r)
    {
        require<InvalidArgument>(!r.prompt.empty(), "request ", r.id, " has an empty prompt");
        require<InvalidArgument>(r.max_new_tokens > 0, "request ", r.id, " asks for ", r.max_new_tokens, " new tokens");
        require<InvalidArgument>(std::isfinite(r.arrival), "request ", r.id, " arrives at ", r.arrival, " s");
        require<InvalidArgument>(records_.empty() || r.arrival >= records_.back().arrival, "request ", r.id,
                                 " arrives at ", r.arrival, " s, before the request submitted before it");
        // Compared alone first: prompt + max_new_tokens of an absurd count would overflow.
        require<CapacityError>(r.max_new_tokens <= pages_.max_positions(), "request ", r.id, " can never be served: it "
                               "asks for ", r.max_new_tokens, " new tokens; a sequence holds at most ",
                               pages_.max_positions(), " positions here");
        try {
            // The last generated token is never appended to the cache.
            pages_.check_fits_ever(static_cast<index_t>(r.prompt.size()) + r.max_new_tokens - 1);
        } catch (const CapacityError& e) {
            raise<CapacityError>("request ", r.id, " can never be served: ", e.what());
        }
        RequestRecord rec;
        rec.id = r.id;
        rec.arrival = r.arrival;
        rec.prompt_tokens = static_cast<index_t>(r.prompt.size());
        records_.push_back(std::move(rec));
        states_.push_back(State{std::move(r.prompt), r.max_new_tokens, -1, 0, 0});
        arrivals_.push_back(records_.size() - 1);
    }

    /// True when every submitted request has finished.
    [[nodiscard]] bool done() const noexcept { return finished_ == records_.size(); }
    [[nodiscard]] std::size_t finished() const noexcept { return finished_; }
    /// The arrival of the next request not yet queued (infinity when none).
    [[nodiscard]] double next_arrival() const noexcept
    {
        return arrivals_.empty() ? std::numeric_limits<double>::infinity() : records_[arrivals_.front()].arrival;
    }

    /// Builds the step for time `now`; an empty batch when nothing can run (wait for
    /// next_arrival()). Grows the pages it needs; preempts when the pool runs out.
    [[nodiscard]] StepPlan plan(double now);

    /// Takes the step's logits, [chunks, vocab] (one row per chunk, its last token's), at time
    /// `now` after the step; samples, records and finishes requests.
    void complete(const StepPlan& step, const Tensor<float>& logits, double now);

    [[nodiscard]] const std::vector<RequestRecord>& records() const noexcept { return records_; }
    [[nodiscard]] index_t running() const noexcept { return static_cast<index_t>(running_.size()); }
    [[nodiscard]] index_t waiting() const noexcept { return static_cast<index_t>(waiting_.size()); }

private:
    struct State {
        std::vector<std::int32_t> sequence;  ///< prompt, then the generated tokens
        index_t max_new_tokens = 0;
        index_t slot = -1;    ///< -1: not running
        index_t cached = 0;   ///< positions in the KV cache
        index_t order = 0;    ///< admission counter: the highest is preempted first
    };

    void preempt(std::size_t r)
    {
        State& s = states_[r];
        pages_.release(s.slot);
        slot_free_[static_cast<std::size_t>(s.slot)] = true;
        s.slot = -1;
        s.cached = 0;
        ++records_[r].preemptions;
        running_.erase(std::find(running_.begin(), running_.end(), r));
        waiting_.push_front(r);
    }

    BlockManager& pages_;
    SchedulerOptions options_;
    std::vector<RequestRecord> records_;
    std::vector<State> states_;
    std::deque<std::size_t> arrivals_;  // submitted, not yet arrived
    std::deque<std::size_t> waiting_;   // arrived, not running (preempted ones at the front)
    std::vector<std::size_t> running_;  // in admission order
    std::vector<bool> slot_free_;
    std::size_t finished_ = 0;
    index_t admitted_ = 0;
};

/// Runs every submitted request to its end: plan a step, run it, complete it; when nothing can
/// run, wait for the next arrival. `clock()` gives the time; `wait_until(t)` moves it to t (a
/// steady clock sleeps, a virtual one jumps); `execute(plan)` runs the step and returns its logits.
/// `progress(records finished, total)` is called after each finished request when given.
template <class Clock, class WaitUntil, class Execute>
void run(Scheduler& scheduler, Clock&& clock, WaitUntil&& wait_until, Execute&& execute,
         const std::function<void(std::size_t, std::size_t)>& progress = {})
{
    while (!scheduler.done()) {
        StepPlan step = scheduler.plan(clock());
        if (step.batch.tokens() == 0) {
            const double next = scheduler.next_arrival();
            require(next < std::numeric_limits<double>::infinity(), "the scheduler has requests it cannot run and none "
                    "arriving (", scheduler.running(), " running, ", scheduler.waiting(), " waiting)");
            wait_until(next);
            continue;
        }
        const Tensor<float> logits = execute(step);
        const std::size_t before = scheduler.finished();
        scheduler.complete(step, logits, clock());
        if (progress && scheduler.finished() != before) progress(scheduler.finished(), scheduler.records().size());
    }
}

// ---------------------------------------------------------------------------------------------

inline StepPlan Scheduler::plan(double now)
{
    while (!arrivals_.empty() && records_[arrivals_.front()].arrival <= now) {
        waiting_.push_back(arrivals_.front());
        arrivals_.pop_front();
    }

    // What each running request appends this step, decodes first (one token each), then
    // prompts in admission order; then new requests while slots, pages and budget last.
    struct Take {
        std::size_t request;
        index_t length;
    };
    std::vector<Take> takes;
    index_t budget = options_.token_budget;
    bool preempted = false;  // this step preempted: admit nothing new (it would take the pages back)
    auto grow = [&](std::size_t r, index_t length) {
        State& s = states_[r];
        while (!pages_.can_grow(s.slot, s.cached + length)) {
            // Preempt the request admitted last; when that is this one, it gives up its own pages
            // (return false). Never an older one: if a newer request could take an older one's
            // pages, two requests short of pages would preempt each other in turn and neither
            // would finish. The oldest running request is never preempted while another runs, and
            // alone it always fits (submit checked), so every run makes progress.
            std::size_t victim = r;
            for (std::size_t q : running_)
                if (states_[q].order > states_[victim].order) victim = q;
            if (victim == r) return false;
            preempted = true;
            takes.erase(std::remove_if(takes.begin(), takes.end(), [&](const Take& t) {
                            if (t.request == victim) budget += t.length;
                            return t.request == victim;
                        }),
                        takes.end());
            preempt(victim);
        }
        pages_.grow(s.slot, s.cached + length);
        return true;
    };

    // Running requests, decoding ones first (they hold the TBT), in admission order.
    std::vector<std::size_t> order = running_;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        const bool da = states_[a].cached + 1 == static_cast<index_t>(states_[a].sequence.size());
        const bool db = states_[b].cached + 1 == static_cast<index_t>(states_[b].sequence.size());
        return da && !db;
    });
    for (std::size_t r : order) {
        if (budget == 0) break;
        if (std::find(running_.begin(), running_.end(), r) == running_.end()) continue;  // preempted meanwhile
        const State& s = states_[r];
        const index_t length = std::min(budget, static_cast<index_t>(s.sequence.size()) - s.cached);
        if (!grow(r, length)) {
            preempt(r);  // the newest running request: it waits for pages itself
            preempted = true;
            continue;
        }
        takes.push_back({r, length});
        budget -= length;
    }
    while (!preempted && budget > 0 && !waiting_.empty()) {
        const auto slot = std::find(slot_free_.begin(), slot_free_.end(), true);
        if (slot == slot_free_.end()) break;
        const std::size_t r = waiting_.front();
        State& s = states_[r];
        const index_t length = std::min(budget, static_cast<index_t>(s.sequence.size()));
        const auto slot_index = static_cast<index_t>(slot - slot_free_.begin());
        if (!pages_.can_grow(slot_index, length)) break;  // new requests never preempt running ones
        waiting_.pop_front();
        *slot = false;
        s.slot = slot_index;
        s.cached = 0;
        s.order = admitted_++;
        running_.push_back(r);
        pages_.grow(s.slot, length);
        takes.push_back({r, length});
        budget -= length;
    }

    StepPlan step;
    std::vector<SequenceChunk> chunks;
    for (const Take& t : takes) {
        const State& s = states_[t.request];
        chunks.push_back({s.slot, s.cached, t.length});
        step.tokens.insert(step.tokens.end(), s.sequence.begin() + s.cached, s.sequence.begin() + s.cached + t.length);
        step.request.push_back(t.request);
        const bool ends = s.cached + t.length == static_cast<index_t>(s.sequence.size());
        step.samples.push_back(ends);
        // A decode appends one generated token; anything else (a prompt chunk, a recomputation
        // after preemption) is prefill.
        if (!(t.length == 1 && s.cached >= records_[t.request].prompt_tokens)) step.prefill_ += t.length;
    }
    step.batch = Batch(std::move(chunks));
    step.batch.with_block_tables(pages_.view());
    return step;
}

inline void Scheduler::complete(const StepPlan& step, const Tensor<float>& logits, double now)
{
    const index_t chunks = step.batch.sequences();
    require(logits.rank() == 2 && logits.shape()[0] == chunks, "the step's logits are ", format_shape(logits.shape()),
            ", expected one row per chunk (", chunks, "): run the step with LogitRows::last_per_chunk");
    const index_t vocab = logits.shape()[1];
    for (index_t c = 0; c < chunks; ++c) {
        const std::size_t r = step.request[static_cast<std::size_t>(c)];
        State& s = states_[r];
        s.cached += step.batch.chunks()[static_cast<std::size_t>(c)].length;
        if (!step.samples[static_cast<std::size_t>(c)]) continue;
        const float* row = logits.values().data() + c * vocab;
        const auto best = static_cast<std::int32_t>(std::max_element(row, row + vocab) - row);  // first maximum
        RequestRecord& rec = records_[r];
        rec.tokens.push_back(best);
        rec.token_times.push_back(now);
        s.sequence.push_back(best);
        const bool stop = std::find(options_.stop_tokens.begin(), options_.stop_tokens.end(), best) != options_.stop_tokens.end();
        if (static_cast<index_t>(rec.tokens.size()) == s.max_new_tokens || stop) {
            pages_.release(s.slot);
            slot_free_[static_cast<std::size_t>(s.slot)] = true;
            s.slot = -1;
            running_.erase(std::find(running_.begin(), running_.end(), r));
            ++finished_;
        }
    }
}

}  // namespace foe::serve
